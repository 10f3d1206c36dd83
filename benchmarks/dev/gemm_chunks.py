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
order, ``u_tiled``, its words would need the slices cut per tile). Prints one line per case and
writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/gemm_chunks.py      # GPU: about two minutes (an estimate)
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
SLICED_SMOKE = {"smoke-sliced": (520, 650)}


class SlicedLayer:
    """A two-path layer's sign words and scales cut into rank slices, with the two factor buffers
    every slice is expanded into."""

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        h: torch.Tensor,
        l: torch.Tensor,
        g: torch.Tensor,
        slices: int,
        dtype: torch.dtype,
    ):
        P, d_out, _ = u.shape
        r, d_in = l.shape[-1], g.shape[-1]
        width = -(-r // (32 * slices)) * 32  # entries of rank a slice, a multiple of the 32 a word holds
        self.h, self.g, self.d_in, self.d_out = h, g, d_in, d_out
        self.parts = []
        for r0 in range(0, r, width):
            r1 = min(r, r0 + width)
            words_u = u[:, :, r0 // 32 : -(-r1 // 32)]
            self.parts.append((v[:, r0:r1].contiguous(), l[:, r0:r1].contiguous(), words_u.contiguous()))
        self.a_buf = torch.empty(P * width * d_in, dtype=dtype, device=u.device)
        self.b_buf = torch.empty(d_out * P * width, dtype=dtype, device=u.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for k, (v, l, u) in enumerate(self.parts):
            P, rk = l.shape
            a = self.a_buf[: P * rk * self.d_in].view(P * rk, self.d_in)
            b = self.b_buf[: self.d_out * P * rk].view(self.d_out, P * rk)
            _expand(v, l, self.g, a, self.d_in, rk, 0)
            _expand(u, self.h, None, b, rk, 0, rk)
            t = torch.mm(x, a.T)
            if k == 0:
                torch.mm(t, b.T, out=y)
            else:
                y.addmm_(t, b.T)
        return y


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
    for k in chunks:
        sliced = SlicedLayer(u, v, h, l, g, k, dtype)
        out = sliced(x, y).float()
        rec[f"chunks_{k}_rel_err"] = ((out - ref).norm() / ref.norm()).item()
        rec[f"chunks_{k}_us"] = gpu_us(lambda s=sliced: s(x, y), device)
        rec[f"chunks_{k}_slices"] = len(sliced.parts)
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
    ap.add_argument("--name", default="gemm_chunks")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter rounds bf16 by truncation
    chunks = [int(c) for c in args.chunks.split(",")]
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
    print(common.write_results(args.name, records, dtype=str(dtype).removeprefix("torch.")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
