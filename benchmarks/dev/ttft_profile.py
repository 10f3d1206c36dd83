"""Where a prompt's time goes: one forward of the Llama-2-7B shape, dense FP16 against packed.

Builds each model with random weights (``runtime.synthetic``; the dense one on the meta device, then
filled), runs one forward of a ``--tokens`` prompt keeping the last logits (what ``prefill.py``'s time
to first token times), and profiles three such forwards. Per model it reports the wall time (median),
the device's busy time, and that time split by kind of kernel: the packed layers' two stages, cuBLAS
GEMMs, attention, and everything else (norms, rotary, activations, residual adds, copies). Wall time
well above busy time means the forward waits on the host (launches, Python), not on kernels. Also the
host time inside ``littlebit::linear`` per call, and the host events (PyTorch ops and CUDA runtime
calls such as launches, allocations and synchronisations) that take the most of it. Writes
``benchmarks/results/ttft_profile.json``.

``--compile`` profiles the forward as ``torch.compile(mode="reduce-overhead")`` runs it (Inductor's
fused kernels, replayed as a CUDA graph: the time to first token of ``ttft_compile.py``), and takes
``ttft_compile.py``'s ``lowrank-BPW`` stand-in too (cuBLAS on unpacked low-rank factors, no expansion),
so that a packed forward's kernels can be set against what the same GEMMs cost without the packing.

    python benchmarks/dev/ttft_profile.py                                   # H200: about a minute
    python benchmarks/dev/ttft_profile.py --compile --layers 8 --models fp16,lowrank-0.1,0.1
    python benchmarks/dev/ttft_profile.py --device cpu --tiny --tokens 96   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# Kernel name fragments, first match wins; the rest is "other".
KINDS = (
    ("packed expansion", ("_expand_kernel",)),
    ("packed stage 1", ("_pf_v_kernel", "_tc_v_kernel")),
    ("packed stage 2", ("_pf_u_kernel", "_tc_u_kernel")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("gemm (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "addmm", "aten::mm", "aten::bmm")),
    ("fused by Inductor", ("triton_poi", "triton_red", "triton_per")),
)
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f.lower() in low for f in fragments):
            return kind
    return "other"


def build(tag: str, device: str, dtype: torch.dtype, overrides: dict):
    from littlebit.runtime.synthetic import random_dense_llama, random_packed_llama

    if tag.startswith("lowrank-") or tag == "no-linear":
        from ttft_compile import build as build_stand_in  # this folder

        return build_stand_in(tag, overrides.get("num_hidden_layers", 32))
    if tag == "fp16":
        return random_dense_llama("llama-2-7b", device, dtype, **overrides)
    return random_packed_llama("llama-2-7b", float(tag), device, dtype, **overrides)


def profile_forward(model, tokens: int, device: str, reps: int, compiled: bool = False) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    run = torch.compile(model, mode="reduce-overhead") if compiled else model

    def forward():
        return run(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    walls = []
    with torch.no_grad():
        for _ in range(3 if compiled else 2):  # compiled: compile, record, replay
            forward()
        for _ in range(reps):
            t0 = common.clock()
            forward()
            walls.append(common.clock() - t0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                forward()
            common.clock()
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type.name == "CUDA"] if device == "cuda" else []
    kinds: dict[str, dict] = {}
    for e in on_device:
        k = kinds.setdefault(kind_of(e.key), {"ms": 0.0, "launches": 0})
        k["ms"] += e.self_device_time_total / 3e3
        k["launches"] += e.count / 3
    op = [e for e in events if e.key == "littlebit::linear"]
    calls = op[0].count / 3 if op else 0
    return {
        "wall_ms_median": round(1e3 * statistics.median(walls), 2),
        "device_busy_ms": round(sum(k["ms"] for k in kinds.values()), 2),
        "kernels": {k: {"ms": round(v["ms"], 2), "launches": round(v["launches"])} for k, v in kinds.items()},
        "top_kernels": [
            {"name": e.key[:100], "ms": round(e.self_device_time_total / 3e3, 3), "calls": e.count / 3}
            for e in sorted(on_device, key=lambda e: -e.self_device_time_total)[:12]
        ],
        # where the host's time goes: self time of PyTorch ops and CUDA runtime calls per forward
        "top_host_events": [
            {"name": e.key[:100], "self_ms": round(e.self_cpu_time_total / 3e3, 3), "calls": e.count / 3}
            for e in sorted(
                (e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total
            )[:12]
        ],
        "packed_op_calls": calls,
        "packed_op_host_us_per_call": round(op[0].cpu_time_total / op[0].count, 1) if op else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fp16,0.1,0.55,1.0", help="fp16 and/or BPW of the packed models")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 256-wide model (smoke tests)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead')")
    ap.add_argument("--name", default="ttft_profile", help="results file name under benchmarks/results")
    args = ap.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    overrides = dict(TINY) if args.tiny else {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    records = []
    for tag in args.models.split(","):
        model = build(tag, args.device, dtype, overrides)
        rec = {"model": f"7b-{tag}" if not args.tiny else f"tiny-{tag}", "tokens": args.tokens}
        rec.update(layers=model.config.num_hidden_layers, compiled=args.compile)
        rec.update(profile_forward(model, args.tokens, args.device, args.reps, args.compile))
        records.append(rec)
        print(
            f"{rec['model']:10s} wall {rec['wall_ms_median']:8.2f} ms  busy {rec['device_busy_ms']:8.2f} ms  "
            + "  ".join(f"{k} {v['ms']:.2f} ms/{v['launches']}" for k, v in rec["kernels"].items())
            + f"  op host {rec['packed_op_host_us_per_call']} us x {rec['packed_op_calls']}"
        )
        print("  host, self ms a forward: " + ", ".join(
            f"{e['name']} {e['self_ms']:.2f} ({e['calls']:.0f})" for e in rec["top_host_events"][:8]
        ))  # fmt: skip
        del model
        torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    path = common.write_results(args.name, records, dtype=str(dtype).removeprefix("torch."))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
