"""Does the GEMM path get faster when it expands its factors a slice of the rank at a time?

The GEMM path (``kernels.gpu.gemm``) writes both factors whole, (d_in + d_out) * P*r 16-bit entries,
then reads them back in two GEMMs: at 0.55 BPW and 256 tokens (batched decoding) that is more memory
traffic than the dense weight's one read. Cut the rank into K slices of 32-entry multiples and, slice
by slice, expand A_k and B_k into the same two buffers, t_k = x A_k^T and y += t_k B_k^T: each slice's
factors are written and read back while they can still sit in L2 (50 MB on the H100 and H200).
This probe times at most K = 1 (the shipped call's work), 2, 4 and 8 slices (K rounds each slice up
to whole words, so fewer may come out: each record says how many) against cuBLAS on the dense bf16 weight
and on the unpacked factors (the floor), at the token counts of batched decoding and prompts, each as
a replayed CUDA graph (medians). The sign words of each slice are cut out once, outside the timing, so
the numbers bound what a layout stored slice by slice would give; S_U is row-ordered here (in tile
order, ``u_tiled``, its words would need the slices cut per tile). End to end, the same slicing stands in
for the GEMM path of the Llama-2-7B shape at 0.55 and 1.0 BPW (each layer's words cut on its first call,
S_U untiled) and ``prefill.bench_serve`` times batch-256 decoding against FP16 (``--serve``); the stand-in
is first checked against the shipped GEMM path on a small layer. Prints one line per case and
writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/gemm_chunks.py      # GPU: about four minutes (an estimate)
    TRITON_INTERPRET=1 python benchmarks/dev/gemm_chunks.py --layers smoke-sliced --bpw 1.0 --tokens 40 \
        --chunks 1,3 --name x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from prefill import LAYERS, SMOKE_LAYERS, factors, gpu_us, random_layer  # noqa: E402

from littlebit.kernels.gpu.gemm import _expand  # noqa: E402

# a small layer whose rank (120 at 1.0 BPW) K = 3 cuts into two slices, the second short, for the interpreter
SLICED_SMOKE = {"smoke-sliced": (520, 640)}


def slice_width(r: int, slices: int) -> int:
    """Rank entries of a slice: at most ``slices`` of them, each a whole number of the 32 a word holds."""
    return -(-r // (32 * slices)) * 32


def cut(u: torch.Tensor, v: torch.Tensor, l: torch.Tensor, slices: int) -> list[tuple]:
    """(S_V words, l, S_U words) of each rank slice; S_U row-ordered."""
    r = l.shape[-1]
    width = slice_width(r, slices)
    parts = []
    for r0 in range(0, r, width):
        r1 = min(r, r0 + width)
        words_u = u[:, :, r0 // 32 : -(-r1 // 32)]
        parts.append((v[:, r0:r1].contiguous(), l[:, r0:r1].contiguous(), words_u.contiguous()))
    return parts


class Buffers:
    """The two factor buffers every slice of every layer is expanded into, grown to the largest slice
    seen (the calls run one after another, so one pair serves all layers; sized by an eager call before
    any CUDA graph is captured)."""

    def __init__(self) -> None:
        self.a = self.b = None

    def take(self, a_size: int, b_size: int, like: torch.Tensor, dtype: torch.dtype) -> tuple:
        if self.a is None or self.a.numel() < a_size or self.a.dtype != dtype:
            self.a = torch.empty(a_size, dtype=dtype, device=like.device)
        if self.b is None or self.b.numel() < b_size or self.b.dtype != dtype:
            self.b = torch.empty(b_size, dtype=dtype, device=like.device)
        return self.a, self.b


def sliced_product(x, parts, h, g, bias, y, bufs: Buffers) -> None:
    """y = the packed product of x, slice by slice: y = sum_k (x A_k^T) B_k^T + bias."""
    d_in, d_out = g.shape[-1], h.shape[-1]
    widest = max(part[1].numel() for part in parts)  # P * slice width
    a_buf, b_buf = bufs.take(widest * d_in, d_out * widest, x, x.dtype)
    for k, (v, l, u) in enumerate(parts):
        P, rk = l.shape
        a = a_buf[: P * rk * d_in].view(P * rk, d_in)
        b = b_buf[: d_out * P * rk].view(d_out, P * rk)
        _expand(v, l, g, a, d_in, rk, 0)
        _expand(u, h, None, b, rk, 0, rk)
        t = torch.mm(x, a.T)
        if k > 0:
            y.addmm_(t, b.T)
        elif bias is None:
            torch.mm(t, b.T, out=y)
        else:
            torch.addmm(bias.to(x.dtype), t, b.T, out=y)


def sliced_gemm_path(slices: int):
    """A stand-in for ``kernels.gpu.gemm.gemm`` (same arguments) that expands the factors ``slices``
    rank slices at a time; each layer's words are cut once, on its first call, and kept."""
    from littlebit.core.packing import untile_order

    cut_layers: dict = {}
    bufs = Buffers()

    def gemm(x2, u, v, h, l, g, bias, y, dtype, u_tiled=False) -> None:
        key = (u.data_ptr(), v.data_ptr(), tuple(u.shape), tuple(v.shape), u_tiled)
        if key not in cut_layers:
            cut_layers[key] = cut(untile_order(u) if u_tiled else u, v, l, slices)
        out = y if y.dtype == dtype else torch.empty(y.shape, dtype=dtype, device=y.device)
        sliced_product(x2.to(dtype), cut_layers[key], h, g, bias, out, bufs)
        if out is not y:
            y.copy_(out)

    return gemm


def check_stand_in(device: str, dtype: torch.dtype) -> float:
    """Largest relative difference between the sliced stand-in and the shipped GEMM path, on a smoke
    layer with S_U in tile order and a bias, over a column slice of the output as grouped calls write."""
    from littlebit.core.packing import tile_order
    from littlebit.kernels.gpu.gemm import gemm as shipped

    d_in, d_out = SLICED_SMOKE["smoke-sliced"]
    u, v, h, l, g = random_layer(d_in, d_out, 1.0, device, seed=5)
    bias = torch.randn(d_out, device=device).to(dtype)
    x = torch.randn(40, d_in, device=device).to(dtype)
    worst = 0.0
    for slices in (1, 3):
        want = torch.zeros(40, 2 * d_out, dtype=dtype, device=device)
        got = torch.zeros_like(want)
        shipped(x, tile_order(u), v, h, l, g, bias, want[:, :d_out], dtype, True)
        sliced_gemm_path(slices)(x, tile_order(u), v, h, l, g, bias, got[:, :d_out], dtype, True)
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    return worst


def serve_records(slices_list: list[int], steps: int) -> list[dict]:
    """Batch-256 decoding of the 7B shape (``prefill.bench_serve``: 128-token prompt, each step one
    CUDA graph) for FP16 and, at each BPW, the GEMM path with the factors whole and in slices."""
    import prefill

    from littlebit.kernels.gpu import triton_littlebit as tk

    shipped = tk.gemm
    records = []
    for tag in ("fp16", "0.55", "1.0"):
        for slices in (0,) if tag == "fp16" else slices_list:
            tk.gemm = shipped if slices <= 1 else sliced_gemm_path(slices)
            try:
                model = prefill.build_7b(tag, "cuda")
                rate = prefill.bench_serve(model, 256, 128, steps, "cuda")
            finally:
                tk.gemm, model = shipped, None
                torch.cuda.empty_cache()
            records.append({"model": f"7b-{tag}", "slices": slices, "serve_tokens_per_s_256": rate})
            print(records[-1], flush=True)
    return records


def time_case(
    layer: list[torch.Tensor], tokens: int, chunks: list[int], dtype: torch.dtype, device: str
) -> dict:
    """µs of dense, unpacked low-rank and each K's sliced call at ``tokens``, and each K's error."""
    u, v, h, l, g = layer
    a32, b32 = factors(u, v, h, l, g)
    a16, b16, w16 = a32.to(dtype), b32.to(dtype), (b32 @ a32).to(dtype)
    x = torch.randn(tokens, g.shape[-1], device=device).to(dtype)
    ref = (x.float() @ a32.T) @ b32.T
    y = torch.empty(tokens, u.shape[1], dtype=dtype, device=device)
    rec = {"dense_us": gpu_us(lambda: F.linear(x, w16), device)}
    rec["lowrank_us"] = gpu_us(lambda: torch.mm(torch.mm(x, a16.T), b16.T), device)
    r = l.shape[-1]
    for k in chunks:
        path = sliced_gemm_path(k)  # its first call, here, cuts the words: the timed calls do not
        path(x, u, v, h, l, g, None, y, dtype)
        rec[f"chunks_{k}_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        rec[f"chunks_{k}_us"] = gpu_us(lambda p=path: p(x, u, v, h, l, g, None, y, dtype), device)
        rec[f"chunks_{k}_slices"] = -(-r // slice_width(r, k))
    return rec


def describe(rec: dict, chunks: list[int]) -> str:
    dense = rec["dense_us"]
    line = f"{rec['layer']:8} {rec['bpw']:5} {rec['tokens']:5}  dense {dense:8.1f}"
    line += f"  low-rank {rec['lowrank_us']:8.1f}"
    for k in chunks:
        us, err = rec[f"chunks_{k}_us"], rec[f"chunks_{k}_rel_err"]
        line += f"  K={k} ({rec[f'chunks_{k}_slices']}): {us:8.1f} ({dense / us:4.2f}x dense, err {err:.1e})"
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="7b-qo,7b-up,7b-down,70b-up")
    ap.add_argument("--bpw", default="0.55,1.0")
    ap.add_argument("--tokens", default="128,256,512,2048")
    ap.add_argument("--chunks", default="1,2,4,8", help="rank slices K to time (1: the whole factors)")
    ap.add_argument("--serve", default="1,2,4", help="slices for batch-256 decoding (GPU); empty: skip")
    ap.add_argument("--steps", type=int, default=16, help="decoding steps timed end to end")
    ap.add_argument("--name", default="gemm_chunks")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter rounds bf16 by truncation
    chunks = [int(c) for c in args.chunks.split(",")]
    stand_in_err = check_stand_in(device, dtype)
    print(f"sliced stand-in against the shipped GEMM path: relative difference {stand_in_err:.1e}")
    records = []
    for name in args.layers.split(","):
        d_in, d_out = {**LAYERS, **SMOKE_LAYERS, **SLICED_SMOKE}[name]
        for bpw in (float(b) for b in args.bpw.split(",")):
            layer = random_layer(d_in, d_out, bpw, device, seed=11)
            for tokens in (int(t) for t in args.tokens.split(",")):
                rec = {"layer": name, "d_in": d_in, "d_out": d_out, "bpw": bpw, "rank": layer[3].shape[-1]}
                rec["tokens"] = tokens
                rec.update(time_case(layer, tokens, chunks, dtype, device))
                records.append(rec)
                print(describe(rec, chunks), flush=True)
    serve = []
    if args.serve and device == "cuda":
        serve = serve_records([int(k) for k in args.serve.split(",")], args.steps)
    meta = {"dtype": str(dtype).removeprefix("torch."), "stand_in_rel_diff": stand_in_err, "serve": serve}
    print(common.write_results(args.name, records, **meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
