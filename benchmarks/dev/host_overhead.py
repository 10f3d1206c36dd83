"""Host time of one packed layer's call on the GEMM path, piece by piece.

A packed forward of the 7B shape spent 404-523 µs of host time per ``littlebit::linear`` call on the
H100 under the profiler (BENCHMARKS.md, "where a 2048-token prompt's time goes"), which makes eager
prompts and evaluation host-bound. This times, on a layer small enough that the GPU never holds the
host back (µs per call, medians of interleaved repetitions):

- ``linear``: nn.Linear of the same shape (the FP baseline);
- ``two_mm``: the GEMM path's two matrix products alone;
- ``expand_launch``: one launch of the expansion kernel (on the CPU: not run);
- ``triton_fn``: ``littlebit_linear_triton``, the backend without the op around it;
- ``op``: ``littlebit_linear`` through ``torch.library`` and the dispatch;
- ``triton_cdiv`` / ``cdiv``: one ceiling division through Triton's wrapper and as plain arithmetic.

On the CPU the kernel launches are replaced by no-ops, so the numbers are the Python around them.
``--layer 7b-up`` (or ``7b-down``, ``7b-qo``) times the packed call on that Llama-2-7B layer at 0.1 BPW
and 128 tokens (the GEMM path's least, where the GPU still keeps up with the host) instead of the tiny
layer, so that what grows with the shape shows; on the CPU the matrix products are then no-ops too
(the pieces ``linear`` and ``two_mm`` are left out there).

    python benchmarks/dev/host_overhead.py [--layer NAME]   # results/host_overhead_{cpu,cuda}[_NAME].json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def per_call_us(fn, device: str, calls: int) -> float:
    """Wall µs per call of ``calls`` calls issued back to back (the GPU drained before and after)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


# d_in, d_out and the rank of one path at 0.1 BPW (the prefill benchmark's layers)
_LAYERS = {"7b-up": (4096, 11008, 128), "7b-down": (11008, 4096, 128), "7b-qo": (4096, 4096, 80)}


class _NoProducts:
    """``torch`` for the GEMM path's module with its matrix products as no-ops (CPU, large layers)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def mm(self, a, b, out=None):
        return out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)

    def addmm(self, bias, a, b, out=None):
        return out


def main() -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(_LAYERS), help="a 7B layer instead of the tiny one")
    args = parser.parse_args()

    import littlebit.kernels
    from littlebit.kernels.gpu import gemm as gemm_module
    from littlebit.kernels.gpu import triton_littlebit as tk
    from littlebit.kernels.gpu.tiles import cdiv
    from littlebit.op import littlebit_linear, register_backend, use_backend

    littlebit.kernels.register()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # the Python around the launches only
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # the factors stay unwritten: garbage must not slow the products

        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        gemm_module._expand_kernel = _NoLaunch()
        register_backend("host-overhead-probe", "cpu", tk.littlebit_linear_triton, lambda *a: True)
        forced = use_backend("host-overhead-probe")  # the op runs the GPU backend's Python
        forced.__enter__()
        if args.layer:
            gemm_module.torch = _NoProducts()
    M, d_in, r, d_out, P = 256, 64, 32, 64, 2
    if args.layer:
        (d_in, d_out, r), M, P = _LAYERS[args.layer], 128, 1
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, d_in, device=device, generator=gen).to(dtype)
    signs = {"device": device, "dtype": torch.int32, "generator": gen}
    u = torch.randint(-(2**31), 2**31 - 1, (P, d_out, -(-r // 32)), **signs)
    v = torch.randint(-(2**31), 2**31 - 1, (P, r, -(-d_in // 32)), **signs)
    h, l, g = (torch.ones(P, n, device=device, dtype=dtype) for n in (d_out, r, d_in))
    a = torch.zeros(P * r, d_in, device=device, dtype=dtype)
    b = torch.zeros(d_out, P * r, device=device, dtype=dtype)
    linear = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    out = torch.empty(P * r, d_in, device=device, dtype=dtype)
    pieces = {
        "linear": lambda: linear(x),
        "two_mm": lambda: torch.mm(torch.mm(x, a.T), b.T),
        "triton_fn": lambda: tk.littlebit_linear_triton(x, u, v, h, l, g),
        "op": lambda: littlebit_linear(x, u, v, h, l, g),
        "triton_cdiv": lambda: triton.cdiv(12345, 32),
        "cdiv": lambda: cdiv(12345, 32),
    }
    if args.layer and device == "cpu":
        del pieces["linear"], pieces["two_mm"]
    if device == "cuda":
        pieces["expand_launch"] = lambda: gemm_module._expand(v, l, g, out, d_in, r, 0)
    times: dict[str, list[float]] = {k: [] for k in pieces}
    with torch.inference_mode():
        for _ in range(7):  # interleaved, so load from other jobs falls on every piece alike
            for name, fn in pieces.items():
                times[name].append(per_call_us(fn, device, 200 if args.layer else 2000))
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    for k, v in medians.items():
        print(f"{k:>14} {v:8.2f} µs")
    path = common.write_results(
        f"host_overhead_{device}" + (f"_{args.layer}" if args.layer else ""),
        [{"piece": k, "us_median": medians[k], "us": times[k]} for k in pieces],
        triton=triton.__version__,
        shape={"tokens": M, "d_in": d_in, "rank": r, "d_out": d_out, "paths": P},
        note=("launches replaced by no-ops on the CPU" + (", matrix products too" if args.layer else ""))
        if device == "cpu"
        else ("one 7B layer, 128 tokens" if args.layer else "host-bound tiny layer"),
    )
    print(path)


if __name__ == "__main__":
    main()
