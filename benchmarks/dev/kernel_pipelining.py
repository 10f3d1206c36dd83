"""What Triton makes of the many-token kernels' inner loops on Hopper, without a GPU: each kernel is
compiled for sm_90 (pointers, and the widths and strides that are multiples of 16 on the 7B and 70B
layers, marked divisible by 16 as a launch on those shapes marks them; token counts, ranks and word
counts not) and its main loops, those holding an MMA, are read from the TTGIR:

- ``async_copies``: loads the software pipeline turned into asynchronous copies to shared memory;
- ``sync_loads``: loads left synchronous (their latency is paid at every step);
- ``register_tiles_to_shared``: tiles computed in registers and stored to shared memory for the MMA;
- ``mma_waits``: the number of MMAs each wait leaves in flight (0: every MMA is waited for before the
  loop goes on; more: the next step's loads and sign decoding overlap it);

and, from ``ptxas -v`` on the PTX, registers per thread and bytes spilled, and from the SASS
(``cuobjdump``) the instructions a thread issues per step of its longest loop, by opcode (``HGMMA``: the
tensor-core MMAs; the rest is decoding, addressing and, where a tile is formed in registers, its
arithmetic and shared-memory stores). Writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/kernel_pipelining.py                        # about a minute, CPU
    python benchmarks/dev/kernel_pipelining.py --source-root DIR      # the kernels of another checkout
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

# integer arguments that are multiples of 16 on the 7B and 70B layers (d_in and d_out of 4096, 8192,
# 11008, 28672; 32-entry padded widths); others (tokens, ranks, words of 11008 = 344) are left unmarked
DIVISIBLE = {"d_in", "d_out", "stride_xm", "stride_ym", "Kp", "Rp", "split_stride", "ones"}
# pointer arguments by name: what the kernels get on a bf16 model (scales fp16, sign words int32)
POINTERS = {
    "x_ptr": "*bf16", "xg_ptr": "*bf16", "g_ptr": "*fp16", "v_ptr": "*i32", "u_ptr": "*i32",
    "l_ptr": "*fp16", "h_ptr": "*fp16", "t_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
    "cnt_ptr": "*i32",
}  # fmt: skip
# (label, module, kernel, constexprs and "t" (t's pointer type where not bf16), warps, stages);
# constexprs missing from a kernel are dropped (an older checkout's kernels take other ones: at
# ``cba965f`` stage 1 formed g * x in its loop and stage 2 added the splits of d_in in a nested one)
COMMON = {"P": 2, "BKW": 2, "OP_DT": "bf16", "HAS_BIAS": False, "TILED": True, "PDL": False, "ZB": 1024}
S1, S2 = "prefill stage 1", "prefill stage 2"
TC1, TC2 = "tensor cores stage 1, 64 rows x 16 tokens", "tensor cores stage 2, 64 rows x 16 tokens"
F32 = "*fp32"  # the 2-64-token kernels' t: an fp32 workspace stage 1 adds into
CASES = [
    (f"{S1}, 64x64", "prefill", "_pf_v_kernel", {"BR": 64, "BM": 64}, 4, 3),
    (f"{S1}, 128x128", "prefill", "_pf_v_kernel", {"BR": 128, "BM": 128}, 8, 3),
    (f"{S2}, 128x64", "prefill", "_pf_u_kernel", {"BO": 128, "BM": 64}, 4, 3),
    (f"{S2}, 128x128", "prefill", "_pf_u_kernel", {"BO": 128, "BM": 128}, 8, 3),
    (TC1, "_tensorcore", "_tc_v_kernel", {"BR": 64, "BM": 16, "t": F32}, 4, 3),
    (TC2, "_tensorcore", "_tc_u_kernel", {"BO": 64, "BM": 16, "t": F32}, 4, 3),
]  # fmt: skip


def compile_sm90(fn, constexprs: dict, warps: int, stages: int, t_type: str = "*bf16"):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names, const_idx = fn.arg_names, set(fn.constexprs)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i in const_idx:
            signature[name] = "constexpr"
            value = constexprs.get(name)
            if value is None:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
            consts[name] = {"bf16": tl.bfloat16}.get(value, value) if isinstance(value, str) else value
        else:
            signature[name] = t_type if name == "t_ptr" else POINTERS.get(name, "i32")
            if name.endswith("_ptr") or name in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def mma_loops(ttgir: str) -> list[str]:
    """The text of each outermost ``scf.for`` region that holds an MMA."""
    loops, depth, start, lines = [], 0, None, ttgir.splitlines()
    for i, line in enumerate(lines):
        if depth == 0 and "scf.for" in line and line.rstrip().endswith("{"):
            start = i
        if start is not None:
            depth += line.count("{") - line.count("}")
            if depth == 0:
                body = "\n".join(lines[start : i + 1])
                if "warp_group_dot " in body or "tt.dot " in body:
                    loops.append(body)
                start = None
    return loops


def loop_record(body: str) -> dict:
    return {
        "async_copies": body.count("async_copy_global_to_local"),
        "sync_loads": len(re.findall(r"= tt\.load ", body)),
        "register_tiles_to_shared": len(re.findall(r"= ttg\.local_alloc %", body)),
        "mma_waits": [int(n) for n in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", body)],
    }


def ptxas_usage(kernel) -> tuple[int | None, int | None]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d, "k.ptx")
        ptx.write_text(kernel.asm["ptx"])
        out = ""
        for ptxas in (bin_dir / "ptxas", bin_dir / "ptxas-blackwell"):  # the one that reads this PTX version
            cmd = [str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull]
            run = subprocess.run(cmd, capture_output=True)
            out = run.stderr.decode()
            if run.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def sass_loop(kernel) -> dict:
    """Instructions per step of the kernel's longest loop (the span of its longest backward branch)."""
    import collections

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    longest: list[str] = []
    for addr, text in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)|BRA\s+0x([0-9a-f]+)", text)
        if target is None:
            continue
        start = int(target.group(1) or target.group(2), 16)
        if start < addr:
            body = [t for a, t in code if start <= a <= addr]
            longest = body if len(body) > len(longest) else longest
    opcodes = collections.Counter(
        re.sub(r"^@!?U?P[T0-9]+\s+", "", t).split()[0].split(".")[0] for t in longest
    )
    return {"instructions": len(longest), "by_opcode": dict(opcodes.most_common())}


def analyse(fn, constexprs: dict, warps: int, stages: int = 3) -> dict:
    """One kernel compiled and read: ``constexprs`` may hold more than ``fn`` takes (``COMMON``, and
    "t" for t's pointer type), which are dropped."""
    consts = dict(constexprs)
    t_type = consts.pop("t", "*bf16")
    wanted = {n: v for n, v in {**COMMON, **consts}.items() if n in fn.arg_names}
    compiled = compile_sm90(fn, wanted, warps, stages, t_type)
    loops = [loop_record(body) for body in mma_loops(compiled.asm["ttgir"])]
    return {"constexprs": wanted, "loops": loops, "sass_loop": sass_loop(compiled), "compiled": compiled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-root", help="a littlebit checkout whose kernels to compile (default: this one)")
    ap.add_argument("--name", default="kernel_pipelining_cpu")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said once
    if args.source_root:  # ahead of this checkout's src, which ``common`` put on the path
        sys.path.insert(0, str(Path(args.source_root, "src").resolve()))
    import importlib

    import triton

    records = []
    for label, module, kernel, consts, warps, stages in CASES:
        mod = importlib.import_module(f"littlebit.kernels.gpu.{module}")
        fn = getattr(mod, kernel, None)
        if fn is None:
            print(f"{label}: no {kernel} in {mod.__file__}", flush=True)
            continue
        read = analyse(fn, consts, warps, stages)
        loops = read["loops"]
        regs, spill = ptxas_usage(read["compiled"])
        rec = {"kernel": label, "function": kernel, "warps": warps, "stages": stages}
        rec.update(constexprs=read["constexprs"], loops=loops, registers=regs, spill_bytes=spill)
        rec["sass_loop"] = read["sass_loop"]
        records.append(rec)
        step = rec["sass_loop"]
        mma = step["by_opcode"].get("HGMMA", 0)
        print(
            f"{label}: {loops} registers {regs} spilled {spill}; {step['instructions']} instructions a step, "
            f"{mma} HGMMA",
            flush=True,
        )
    print(common.write_results(args.name, records, triton=triton.__version__, source_root=args.source_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
