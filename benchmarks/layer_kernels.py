"""Packed LittleBit kernels against fp16 F.linear on one GPU, for Llama-2-7B and -70B layer shapes.

Run from the repository root:

    python3 benchmarks/layer_kernels.py [--out FILE] [--sweep] [--profile] [--quick]

Per shape, BPW (rank from the budget formula, residual path on) and batch it times, with CUDA graphs and
weights rotated among enough copies to spill the 50 MB L2: fp16 ``F.linear``; the same low-rank product
with unpacked fp16 factors (scales folded in, both paths: two GEMMs); and the Triton kernel. Weights are
random packed words and random positive scales, so no model is needed. It also reports the bandwidth the
packed bytes imply against a measured device-to-device copy, and the kernel's error against an fp32 dense
reconstruction of the same layer. ``--cpu`` instead times the cpu-lut backend against fp32 F.linear on
the SmolLM2-135M shapes.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from littlebit.core import budget, packing  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
BPWS = [0.1, 0.3, 0.55, 0.8, 1.0]
BATCHES = [1, 4, 16]
ROTATE_BYTES = 160e6  # > 3x the H100's 50 MB L2
SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


_KERNEL_MODULES = {"cpu_lut": "littlebit.kernels.cpu.lut"}


def import_kernel(name: str):
    """A kernel module by its short name (``cpu_lut``, ``triton_littlebit``, ``cuda_mma``, ...)."""
    return importlib.import_module(_KERNEL_MODULES.get(name, f"littlebit.kernels.gpu.{name}"))


def rank_for_bpw(d_in: int, d_out: int, bpw: float) -> int:
    return budget.rank_for_bpw(d_in, d_out, bpw, residual=True)


def packed_bytes(d_in: int, d_out: int, r: int) -> int:
    return budget.packed_bytes(d_in, d_out, r, residual=True)


def unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    return packing.unpack_signs(words, n, torch.float32)


def random_layer(d_in: int, d_out: int, r: int, dev: str, gen: torch.Generator) -> list[torch.Tensor]:
    def words(*shape):
        return torch.randint(-(2**31), 2**31, shape, generator=gen, device=dev, dtype=torch.int64).to(
            torch.int32
        )

    def scale(n, fan):
        return ((torch.rand(2, n, generator=gen, device=dev) + 0.5) / fan**0.5).half()

    return [
        words(2, d_out, math.ceil(r / 32)),
        words(2, r, math.ceil(d_in / 32)),
        scale(d_out, r),
        scale(r, d_in),
    ]


def dense_reconstruction(u, v, h, l, g, d_in, r) -> torch.Tensor:
    """fp32 (d_out, d_in) weight of the layer: sum_p diag(h) S_U diag(l) S_V^T diag(g)."""
    w = None
    for p in range(u.shape[0]):
        su = unpack(u[p], r) * h[p].float()[:, None]
        sv = unpack(v[p], d_in) * l[p].float()[:, None] * g[p].float()[None, :]
        w = su @ sv if w is None else w + su @ sv
        del su, sv
    return w


def time_graph(calls: list, reps: int) -> float:
    """Median µs per call of a CUDA graph that runs every call once (one per weight copy)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def reps_for(us_estimate: float, n_calls: int) -> int:
    return int(min(50, max(7, 0.25e6 / max(1.0, us_estimate * n_calls))))


def stage2_inputs(d_in: int, d_out: int, bpw: float, gen: torch.Generator, rank: int = 0) -> tuple:
    """A stage-2-alone case: (r, W_r, bytes of S_U and h, weight copies larger than L2, t (2, 32 W_r)
    zero past the rank); ``rank`` instead of the BPW's when given."""
    r = rank or rank_for_bpw(d_in, d_out, bpw)
    W_r = math.ceil(r / 32)
    u_bytes = 2 * d_out * W_r * 4 + 2 * d_out * 2
    layers = [random_layer(d_in, d_out, r, "cuda", gen) for _ in range(n_copies(u_bytes))]
    t = torch.randn(2, 32 * W_r, generator=gen, device="cuda")
    t[:, r:] = 0
    return r, W_r, u_bytes, layers, t


def write_records(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {out}")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    us = time_graph([lambda: dst.copy_(src)], 20)
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def n_copies(nbytes: float, cap: int = 1024) -> int:
    return int(min(cap, max(2, math.ceil(ROTATE_BYTES / nbytes))))


def lowrank_factors(u, v, h, l, g, d_in, r) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 A (d_in, 2r), B (2r, d_out) with every scale folded in: y = (x @ A) @ B."""
    a = torch.cat([(unpack(v[p], d_in) * l[p].float()[:, None] * g[p].float()[None, :]) for p in range(2)])
    b = torch.cat([(unpack(u[p], r) * h[p].float()[:, None]) for p in range(2)], dim=1)
    return a.T.contiguous().half(), b.T.contiguous().half()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_shape(
    tk, d_in, d_out, bpws, batches, cfg, gen, copy_gbps, device, deadline, variants=None
) -> list[dict]:
    """``variants``: name -> (config, tokens it applies to): timed as well, into ``rec["variants"]``."""
    records = []
    xs = {m: torch.randn(m, d_in, generator=gen, device="cuda").half() for m in batches}
    ws = [
        torch.randn(d_out, d_in, generator=gen, device="cuda").half()
        for _ in range(n_copies(2 * d_in * d_out))
    ]
    us_fp16 = {
        m: time_graph([lambda w=w, m=m: F.linear(xs[m], w) for w in ws], reps_for(150, len(ws)))
        for m in batches
    }
    del ws
    for bpw in bpws:
        if time.time() > deadline:
            print(f"  deadline reached: skipping {d_in}x{d_out} from bpw {bpw}")
            break
        r = rank_for_bpw(d_in, d_out, bpw)
        nbytes = packed_bytes(d_in, d_out, r)
        g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
        layers = [(*random_layer(d_in, d_out, r, "cuda", gen), g) for _ in range(n_copies(nbytes))]
        u, v, h, l, _ = layers[0]
        w_ref = dense_reconstruction(u, v, h, l, g, d_in, r)
        a0, b0 = lowrank_factors(u, v, h, l, g, d_in, r)
        lr = [(a0, b0)] + [
            (torch.randn_like(a0).sign(), torch.randn_like(b0).sign())
            for _ in range(n_copies(a0.numel() * 2 + b0.numel() * 2) - 1)
        ]
        # S_U as a prepared model holds it (``packed.prepare_for_decoding``): in tile order where the
        # batch-1 calls take the bit-serial stage 2; row order is timed too ("us_littlebit_row_order")
        tiled = tk.tile_order_pays(u, torch.float16, cfg)
        tile_order = importlib.import_module("littlebit.core.packing").tile_order
        run = functools.partial(tk.littlebit_linear_triton, config=cfg, u_tiled=tiled)
        deployed = [(tile_order(c[0]), *c[1:]) for c in layers] if tiled else layers
        for m in batches:
            x = xs[m]
            ref = x.float() @ w_ref.T
            y = run(x, *deployed[0])
            err = rel_err(y, ref)
            err_lr = rel_err((x @ a0) @ b0, ref)
            us_lb = time_graph([functools.partial(run, x, *c) for c in deployed], reps_for(20, len(layers)))
            us_rows = us_lb
            if tiled:
                rows_call = functools.partial(tk.littlebit_linear_triton, config=cfg)
                calls = [functools.partial(rows_call, x, *c) for c in layers]
                us_rows = time_graph(calls, reps_for(20, len(layers)))
            us_lr = time_graph([lambda a=a, b=b, x=x: (x @ a) @ b for a, b in lr], reps_for(50, len(lr)))
            gbps = nbytes / (us_lb * 1e-6) / 1e9
            rec = dict(
                d_in=d_in, d_out=d_out, bpw=bpw, batch=m, rank=r, packed_bytes=nbytes,
                us_fp16=round(us_fp16[m], 2), us_lowrank_fp16=round(us_lr, 2), us_littlebit=round(us_lb, 2),
                speedup=round(us_fp16[m] / us_lb, 2), speedup_vs_lowrank=round(us_lr / us_lb, 2),
                gbps=round(gbps, 1), copy_gbps=round(copy_gbps, 1), bw_fraction=round(gbps / copy_gbps, 3),
                floor_us=round(nbytes / (copy_gbps * 1e9) * 1e6, 2), rel_err=float(f"{err:.3g}"),
                rel_err_lowrank_fp16=float(f"{err_lr:.3g}"), device=device,
                path="gemv" if m <= cfg.gemv_max_tokens else "tensor-core",
                u_tile_order=tiled, us_littlebit_row_order=round(us_rows, 2),
            )  # fmt: skip
            for name, (vcfg, toks) in (variants or {}).items():
                if m in toks:
                    verr = rel_err(tk.littlebit_linear_triton(x, u, v, h, l, g, config=vcfg), ref)
                    fn = tk.littlebit_linear_triton
                    calls = [lambda c=c, x=x, k=vcfg, f=fn: f(x, *c, config=k) for c in layers]
                    vus = time_graph(calls, reps_for(20, len(layers)))
                    rec.setdefault("variants", {})[name] = {
                        "us": round(vus, 2), "speedup": round(us_fp16[m] / vus, 2),
                        "rel_err": float(f"{verr:.3g}"),
                    }  # fmt: skip
                    print(f"    variant {name}: {vus:7.2f} us  x{us_fp16[m] / vus:6.2f}", flush=True)
            records.append(rec)
            print(
                f"{d_in:>6}x{d_out:<6} bpw {bpw:<4} r {r:>5} b {m:>2}  fp16 {us_fp16[m]:8.1f}  "
                f"lowrank {us_lr:8.1f}  littlebit {us_lb:7.2f} us  x{us_fp16[m] / us_lb:6.1f}  "
                f"{gbps:6.0f} GB/s ({gbps / copy_gbps:4.0%})  err {err:.1e}",
                flush=True,
            )
        del layers, lr, w_ref, a0, b0, u, v, h, l
        torch.cuda.empty_cache()
    return records


def sweep(tk, gen, plan: list, out: Path | None) -> None:
    """µs and error per config on a few cases, to choose the defaults (docs/kernels.md).

    ``plan``: (cases, configs) pairs; each case is (d_in, d_out, bpw, batch).
    """

    def timed(cfg, x, layers):
        return round(
            time_graph([lambda c=c: tk.littlebit_linear_triton(x, *c, config=cfg) for c in layers], 15), 2
        )

    rows = []
    for cases, configs in plan:
        for d_in, d_out, bpw, m in cases:
            r = rank_for_bpw(d_in, d_out, bpw)
            g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
            nc = n_copies(packed_bytes(d_in, d_out, r))
            layers = [(*random_layer(d_in, d_out, r, "cuda", gen), g) for _ in range(nc)]
            x = torch.randn(m, d_in, generator=gen, device="cuda").half()
            u, v, h, l, _ = layers[0]
            ref = x.float() @ dense_reconstruction(u, v, h, l, g, d_in, r).T
            line = {"d_in": d_in, "d_out": d_out, "bpw": bpw, "batch": m, "rank": r}
            for name, cfg in configs.items():
                try:
                    err = rel_err(tk.littlebit_linear_triton(x, *layers[0], config=cfg), ref)
                    line[name] = timed(cfg, x, layers) if err < 1e-2 else f"wrong: rel err {err:.2e}"
                except Exception as e:  # a config that does not compile is a result too
                    line[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
            rows.append(line)
            print("sweep", json.dumps(line), flush=True)
            del layers, ref
            torch.cuda.empty_cache()
    if out is not None:
        out.write_text(json.dumps(rows, indent=1))


def profile(tk, gen, cases: list) -> None:
    """Per-kernel device time (no graphs) for a few cases: where the time of a call goes."""
    try:
        _profile(tk, gen, cases)
    except Exception as e:  # the profiler is a diagnostic; never lose the table to it
        print(f"profile failed: {type(e).__name__}: {e}", flush=True)


def _profile(tk, gen, cases: list) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for d_in, d_out, bpw, m in cases:
        r = rank_for_bpw(d_in, d_out, bpw)
        g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
        layers = [
            (*random_layer(d_in, d_out, r, "cuda", gen), g)
            for _ in range(n_copies(packed_bytes(d_in, d_out, r)))
        ]
        x = torch.randn(m, d_in, generator=gen, device="cuda").half()
        for c in layers[:2]:
            tk.littlebit_linear_triton(x, *c)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                for c in layers:
                    tk.littlebit_linear_triton(x, *c)
            torch.cuda.synchronize()
        parts = []
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
                us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / max(
                    1, e.count
                )
                parts.append(f"{e.key[:40]}: {us:.2f} us x{e.count}")
        print(f"profile {d_in}x{d_out} bpw {bpw} r {r} b {m}: " + "; ".join(parts), flush=True)
        del layers


def _median_us(fn, n: int = 2000) -> float:
    for _ in range(100):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def _cpu_row(cpu_lut, d_in: int, d_out: int, gen: torch.Generator) -> dict:
    r = rank_for_bpw(d_in, d_out, 0.55)
    u, v, h, l = random_layer(d_in, d_out, r, "cpu", gen)
    g = (torch.rand(2, d_in, generator=gen) + 0.5).half()
    b = torch.randn(d_out)
    x = torch.randn(1, d_in)
    # cold: rotate among copies of the dense weight that overflow a 32 MB L3, as decoding a model does
    ws = [torch.randn(d_out, d_in) for _ in range(n_copies(4 * d_in * d_out, cap=256))]
    it = iter(range(1 << 62))
    return dict(
        d_in=d_in, d_out=d_out, bpw=0.55, batch=1, rank=r, threads=torch.get_num_threads(),
        us_cpu_lut=round(_median_us(lambda: cpu_lut.littlebit_linear_cpu_lut(x, u, v, h, l, g, b)), 2),
        us_fp32_hot=round(_median_us(lambda: F.linear(x, ws[0], b)), 2),
        us_fp32_cold=round(_median_us(lambda: F.linear(x, ws[next(it) % len(ws)], b)), 2),
        us_torch_lut=round(_median_us(lambda: cpu_lut._torch_lut(x, u, v, h, l, g), n=200), 2),
    )  # fmt: skip


def bench_cpu(out: Path | None) -> None:
    """cpu-lut against fp32 F.linear for SmolLM2-135M's shapes at 0.55 BPW, batch 1, 2 threads."""
    cpu_lut = import_kernel("cpu_lut")
    torch.set_num_threads(2)
    cpu_lut.native_library()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d_in, d_out in SMOL_SHAPES:
        rows.append(_cpu_row(cpu_lut, d_in, d_out, gen))
        print("cpu", json.dumps(rows[-1]), flush=True)
    if out is not None:
        out.write_text(json.dumps(rows, indent=1))


def check_asm(tk, gen):
    """The default config, without the inline-PTX decoding if it fails to build or to match here."""
    d_in, d_out, r = 4096, 4096, 552
    g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
    u, v, h, l = random_layer(d_in, d_out, r, "cuda", gen)
    x = torch.randn(1, d_in, generator=gen, device="cuda").half()
    ref = x.float() @ dense_reconstruction(u, v, h, l, g, d_in, r).T
    try:
        err = rel_err(tk.littlebit_linear_triton(x, u, v, h, l, g, config=tk.KernelConfig(asm=True)), ref)
    except Exception as e:
        print(
            f"asm decoding unavailable ({type(e).__name__}: {str(e)[:300]}); using plain decoding", flush=True
        )
        return tk.KernelConfig(asm=False)
    print(f"asm decoding rel err {err:.2e}", flush=True)
    return tk.DEFAULT_CONFIG if err < 1e-2 else tk.KernelConfig(asm=False)


def named_variants(K) -> dict:
    """Name -> (KernelConfig, token counts it applies to): configs timed beside the defaults."""
    variants = {  # the defaults use programmatic dependent launch on sm_90+; these are the others
        "two-launch-no-pdl": (K(pdl=False), range(1, 65)),
    }
    b1 = range(1, 2)  # GEMV tile choices, re-checked with programmatic dependent launch on
    for name, kw in [("waves4", {"waves": 4.0}), ("waves16", {"waves": 16.0}), ("rows_u2", {"rows_u": 2}),
                     ("rows_u8", {"rows_u": 8}), ("rows_v4", {"rows_v": 4}), ("rows_v16", {"rows_v": 16}),
                     ("warps2", {"warps": 2}), ("warps8", {"warps": 8}), ("words_u16", {"words_u": 16}),
                     ("reduce", {"gemv_reduce": True}), ("atomic", {"gemv_reduce": False}),
                     ("reduce-rows_u8", {"gemv_reduce": True, "rows_u": 8}),
                     # stage 1 unsplit over d_in writes t directly (no atomics, no
                     # ticket, nothing for stage 2 to clear), with fewer rows per program for more of them
                     ("reduce-nosplit", {"gemv_reduce": True, "waves": 0.1}),
                     ("reduce-nosplit-rows_v4", {"gemv_reduce": True, "waves": 0.1, "rows_v": 4}),
                     ("reduce-nosplit-rows_v2", {"gemv_reduce": True, "waves": 0.1, "rows_v": 2}),
                     ("reduce-waves1", {"gemv_reduce": True, "waves": 1.0}),
                     ("reduce-waves2", {"gemv_reduce": True, "waves": 2.0}),
                     ("reduce-words_u16", {"gemv_reduce": True, "words_u": 16}),
                     ("atomic-waves2", {"gemv_reduce": False, "waves": 2.0}),
                     ("rows_u16", {"rows_u": 16}), ("reduce-rows_u16", {"gemv_reduce": True, "rows_u": 16}),
                     ("rows_u_small4", {"rows_u_small": 4}),  # the sixth version's small-layer tile
                     ("words_u8", {"words_u": 8}),
                     ("reduce-words_u8", {"gemv_reduce": True, "words_u": 8})]:  # fmt: skip
        variants[name] = (K(**kw), b1)
    # stage 2 on tensor cores (cuda_mma), tiles as mma-<16-row tiles>-<words>-<warps>;
    # these turn the bit-serial stage 2 off, which would
    # otherwise take the layers with rows of 32+ words
    mma = {"stage2_mma": True, "stage2_bitserial": False}
    variants["mma"] = (K(**mma), b1)
    variants["no-mma"] = (K(stage2_mma=False, stage2_bitserial=False), b1)  # the seventh version's stage 2
    for mt in (1, 2, 4):
        for wpt in (1, 2, 4):
            for warps in (2, 4, 8):
                kw = {**mma, "mma_rows": mt, "mma_words": wpt, "mma_warps": warps}
                variants[f"mma-{mt}-{wpt}-{warps}"] = (K(**kw), b1)
    # how far stage 1 splits d_in (its partial sums and ticket are on the critical path
    # of small layers) with the tensor-core stage 2, at the default tile and at 4 x 16 rows, 1 word
    for waves in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        variants[f"mma-waves{waves:g}"] = (K(**mma, waves=waves), b1)
        kw = {**mma, "mma_rows": 4, "mma_words": 1, "mma_warps": 4, "waves": waves}
        variants[f"mma-4-1-4-waves{waves:g}"] = (K(**kw), b1)
    # stage 2 as bit-serial binary MMAs (cuda_bitserial), tiles as
    # bits-<16-row tiles a warp>-<warps splitting a row group's units>-<row groups>-<units in flight>
    variants["bitserial"] = (K(stage2_bitserial=True), b1)
    variants["no-bitserial"] = (K(stage2_bitserial=False), b1)  # the ninth version's stage 2
    bit_tiles = [(1, 1, 4, 4), (2, 1, 4, 4), (1, 4, 2, 2), (2, 2, 2, 4), (1, 1, 8, 4), (2, 2, 4, 4),
                 (2, 2, 2, 6), (2, 4, 1, 4), (2, 4, 2, 4), (4, 2, 2, 4), (1, 2, 4, 4), (2, 2, 2, 2),
                 (1, 4, 1, 4), (1, 8, 1, 2), (2, 2, 2, 8), (2, 2, 1, 4), (1, 2, 2, 4), (2, 1, 2, 4),
                 (1, 2, 2, 6), (2, 2, 1, 6), (1, 4, 2, 4)]  # fmt: skip

    def bits(mt, ks, rg, depth) -> dict:
        return {
            "stage2_bitserial": True,
            "bits_rows": mt,
            "bits_split": ks,
            "bits_groups": rg,
            "bits_depth": depth,
        }

    for tile in bit_tiles:
        variants["bits-{}-{}-{}-{}".format(*tile)] = (K(**bits(*tile)), b1)
    variants["bits-stage2-only"] = (K(stage2_bitserial=True, stage1_bitserial=False), b1)  # Triton stage 1
    # stage 1 quantizes for the bit-serial stage 2 itself (default); "quantize-kernel"
    # and "-t" / "-launches" quantize in launches of their own
    variants["quantize-kernel"] = (K(quantize_in_stage1=False), b1)
    bits1 = {"stage2_bitserial": True, "stage1_bitserial": True}
    variants["bits-stage1"] = (K(**bits1), b1)  # quantizing t itself
    variants["bits-stage1-launches"] = (K(**bits1, quantize_in_stage1=False), b1)
    for waves in (4, 12, 16, 32):  # the Triton stage 1's split of d_in
        variants[f"bits-waves{waves}"] = (K(stage2_bitserial=True, waves=float(waves)), b1)
    for rows in (4, 16):  # and its rows per thread
        variants[f"bits-rows_v{rows}"] = (K(stage2_bitserial=True, rows_v=rows), b1)
    t_planes = {"stage1_bitserial": False, "quantize_in_stage1": False}
    variants["bits-stage2-only-t"] = (K(stage2_bitserial=True, **t_planes), b1)
    bit1_tiles = [(1, 4, 1, 4), (1, 8, 1, 4), (1, 2, 2, 4), (2, 4, 1, 4), (1, 8, 1, 2), (1, 4, 2, 4),
                  (1, 1, 4, 4), (2, 2, 2, 4), (1, 4, 1, 8)]  # fmt: skip
    for mt, ks, rg, depth in bit1_tiles:
        kw = {"stage2_bitserial": True, "bits1_rows": mt, "bits1_split": ks, "bits1_groups": rg}
        variants[f"bits1-{mt}-{ks}-{rg}-{depth}"] = (K(**kw, bits1_depth=depth), b1)
    return variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="GPU table (default benchmarks/results/kernels.json); CPU rows")
    ap.add_argument("--sweep-out", type=Path, help="where to write the sweep's rows")
    ap.add_argument("--quick", action="store_true", help="two shapes, two BPWs")
    ap.add_argument("--acceptance", action="store_true", help="only the four acceptance cases")
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="token counts of the grid")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="also time these named KernelConfig variants on the same layers (none named: all)",
    )
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="time the cpu-lut backend instead")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new work after this")
    ap.add_argument("--single", help="d_in,d_out,bpw,batch: a few plain calls and exit (for ncu)")
    ap.add_argument("--single-variant", help="a named variant's config for --single (default: the defaults)")
    args = ap.parse_args()
    if args.cpu:
        bench_cpu(args.out)
        return
    args.out = args.out or Path(f"benchmarks/results/kernels{'_acceptance' if args.acceptance else ''}.json")
    t_start = time.time()
    tk = import_kernel("triton_littlebit")
    if args.single:
        d_in, d_out, bpw, m = (float(f) for f in args.single.split(","))
        d_in, d_out, m = int(d_in), int(d_out), int(m)
        gen = torch.Generator(device="cuda").manual_seed(0)
        layer = random_layer(d_in, d_out, rank_for_bpw(d_in, d_out, bpw), "cuda", gen)
        g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
        x = torch.randn(m, d_in, generator=gen, device="cuda").half()
        cfg = named_variants(tk.KernelConfig)[args.single_variant][0] if args.single_variant else None
        for _ in range(3):
            tk.littlebit_linear_triton(x, *layer, g, config=cfg)
        torch.cuda.synchronize()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbps = copy_bandwidth()
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)", flush=True)
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(
            tk,
            gen,
            [(4096, 4096, 0.55, 1), (8192, 28672, 1.0, 1), (28672, 8192, 1.0, 1), (8192, 28672, 0.55, 16)],
        )
    if args.sweep:
        K = tk.KernelConfig
        gemv = {
            "default": K(),
            "rows_v4": K(rows_v=4),
            "rows_v16": K(rows_v=16),
            "rows_u2": K(rows_u=2),
            "rows_u8": K(rows_u=8),
            "words_u8": K(words_u=8),
            "words_u32": K(words_u=32),
            "waves2": K(waves=2.0),
            "waves8": K(waves=8.0),
            "warps8": K(warps=8),
            "plain": K(asm=False),
        }
        tc = {
            "tc_128_2_w4": K(),
            "tc_128_4_w4": K(tc_words=4),
            "tc_128_4_w8": K(tc_words=4, tc_warps=8),
            "tc_256_4_w8": K(tc_rows=256, tc_words=4, tc_warps=8),
            "tc_64_2_w4": K(tc_rows=64),
            "tc_128_2_waves2": K(waves=2.0),
            "gemv_all": K(gemv_max_tokens=4),
        }
        b1 = [(4096, 4096, 0.55, 1), (8192, 28672, 0.1, 1), (8192, 28672, 1.0, 1), (28672, 8192, 1.0, 1)]
        b1 += [(4096, 11008, 0.3, 1)]
        bn = [(4096, 11008, 0.3, 4), (8192, 28672, 0.55, 4), (8192, 28672, 0.55, 16), (4096, 4096, 0.55, 16)]
        bn += [(28672, 8192, 1.0, 16)]
        sweep(tk, gen, [(b1, gemv), (bn, tc)], args.sweep_out)
    if args.no_table:
        return
    shapes, bpws = (SHAPES[:1] + SHAPES[4:5], [0.1, 1.0]) if args.quick else (SHAPES, BPWS)
    deadline = t_start + args.budget_s
    records = []
    cases = [((d_in, d_out), bpws, args.batches) for d_in, d_out in shapes]
    if args.acceptance:
        cases = [((8192, 28672), [0.1, 1.0], [1]), ((4096, 4096), [0.55], [1]), ((8192, 28672), [0.55], [16])]
    variants = None
    if args.variants is not None:
        variants = named_variants(tk.KernelConfig)
        unknown = set(args.variants) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if not args.variants or k in args.variants}
    for (d_in, d_out), case_bpws, batches in cases:
        records += bench_shape(
            tk, d_in, d_out, case_bpws, batches, tk.DEFAULT_CONFIG, gen, copy_gbps, device, deadline, variants
        )
        args.out.write_text(json.dumps(records, indent=1))
    print(f"\n{'shape':>13} {'bpw':>4} {'b':>2} {'rank':>5} {'fp16 us':>8} {'lowrank':>8} {'littlebit':>9} "
          f"{'x fp16':>7} {'GB/s':>6} {'of copy':>7} {'rel err':>8}")  # fmt: skip
    for r in records:
        print(
            f"{r['d_in']:>6}x{r['d_out']:<6} {r['bpw']:>4} {r['batch']:>2} {r['rank']:>5} "
            f"{r['us_fp16']:>8.1f} {r['us_lowrank_fp16']:>8.1f} {r['us_littlebit']:>9.2f} "
            f"{r['speedup']:>7.1f} {r['gbps']:>6.0f} {r['bw_fraction']:>7.0%} {r['rel_err']:>8.1e}"
        )
    print(f"total {time.time() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
