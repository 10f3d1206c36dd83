"""Many tokens on the GPU: the factors expanded per call, then two cuBLAS GEMMs.

With many tokens a packed layer is bound by its multiply-adds, and cuBLAS does those at several times
the rate of the prefill kernels (``prefill``), whose inner loops decode signs between
their MMAs. So such a call writes the dense factors once, scales folded in, into memory that PyTorch's
allocator hands back after the call (nothing stays resident: the layer is still its sign words), and
runs

    t = x @ A^T,   A = [l_p * S_V,p^T * g_p]_p    (P*r x d_in: both paths' latents side by side)
    y = t @ B^T + bias,   B = [h_p * S_U,p]_p      (d_out x P*r: one GEMM sums the paths)

as the CPU's ``cpu-gemm`` backend does. Writing the factors costs one 16-bit store per entry, the GEMMs
2 * tokens multiply-adds per entry; measured on the H100 the GEMMs are faster than the prefill kernels
from 128 tokens on every layer of the sweep (``KernelConfig.gemm_min_tokens``; docs/kernels.md gives the
numbers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from littlebit.kernels.gpu.tiles import cdiv

# rows and entries of a factor per program of the expansion
_ROWS, _COLS = 32, 256


@triton.jit
def _word_index(i, k, W, TILED: tl.constexpr):
    """Where word ``k`` (a row of word numbers) of rows ``i`` (a column) sits among a path's W-word
    rows: row-ordered, or with ``TILED`` in tile order (``packing.tile_order``: each 16-row tile's
    blocks of 8 words in fragment order, then the tail)."""
    if TILED:
        full = W // 8 * 8
        g16 = (i % 16)[:, None]
        q = k % 8
        head = (k // 8) * 128 + (g16 % 8) * 16 + (q // 2) * 4 + (q % 2) * 2 + g16 // 8
        tail = 16 * full + g16 * (W - full) + (k - full)
        word = (i // 16)[:, None] * (16 * W) + tl.where(k < full, head, tail)
    else:
        word = i[:, None] * W + k
    return word


@triton.jit
def _expand_kernel(
    w_ptr, rs_ptr, cs_ptr, out_ptr, rows, n, W, stride_out, row_off, col_off, n_rb,
    HAS_CS: tl.constexpr, TILED: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
):  # fmt: skip
    """out[p * row_off + i, p * col_off + j] = rs[p, i] * cs[p, j] * (+-1 of bit j of row i of path p),
    the words in tile order (``packing.tile_order``) with ``TILED``. A program takes (rows, words,
    bits) tiles: each word is loaded and addressed once, then shifted into its 32 entries (loaded and
    addressed per entry, the expansion was 1.8-5.2x slower: docs/kernels.md)."""
    pid0, pid1 = tl.program_id(0), tl.program_id(1)
    p = pid0 // n_rb
    i = (pid0 % n_rb) * BR + tl.arange(0, BR)
    k = pid1 * BW + tl.arange(0, BW)
    i_ok = i < rows
    word = _word_index(i, k[None, :], W, TILED)
    w = tl.load(w_ptr + p * rows * W + word, mask=i_ok[:, None] & (k < W)[None, :], other=0)
    bit = tl.arange(0, 32)
    e = k[:, None] * 32 + bit[None, :]  # (words, bits): entry index in the row
    e_ok = e < n
    val = tl.where(((w[:, :, None] >> bit[None, None, :]) & 1) != 0, 1.0, -1.0)
    val = val * tl.load(rs_ptr + p * rows + i, mask=i_ok, other=0.0).to(tl.float32)[:, None, None]
    if HAS_CS:
        val = val * tl.load(cs_ptr + p * n + e, mask=e_ok, other=0.0).to(tl.float32)[None, :, :]
    dst = out_ptr + (p * row_off + i)[:, None, None] * stride_out + (p * col_off + e)[None, :, :]
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=i_ok[:, None, None] & e_ok[None, :, :])


def _expand(words, rs, cs, out, n: int, row_off: int, col_off: int, tiled: bool = False) -> None:
    P, rows, W = words.shape
    words, rs = words.contiguous(), rs.contiguous()  # indexed as dense (P, rows, ...) below
    cs = None if cs is None else cs.contiguous()
    n_rb = cdiv(rows, _ROWS)
    args = (words, rs, rs if cs is None else cs, out, rows, n, W, out.stride(0), row_off, col_off, n_rb)
    _expand_kernel[(P * n_rb, cdiv(W, _COLS // 32))](
        *args, HAS_CS=cs is not None, TILED=tiled, BR=_ROWS, BW=_COLS // 32, num_warps=4
    )


def expanded_factors(
    u: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    dtype: torch.dtype,
    u_tiled: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (P*r x d_in) and B (d_out x P*r) of one layer in ``dtype``, with y = x A^T B^T + bias;
    ``u_tiled``: S_U's words in tile order; ``out``: flat buffers of at least that many entries to
    write them into (A and B are then views of their first entries)."""
    P, d_out, _ = u.shape
    r, d_in = l.shape[-1], g.shape[-1]
    if out is None:
        a = torch.empty((P * r, d_in), dtype=dtype, device=u.device)
        b = torch.empty((d_out, P * r), dtype=dtype, device=u.device)
    else:
        a, b = out[0][: P * r * d_in].view(P * r, d_in), out[1][: d_out * P * r].view(d_out, P * r)
    _expand(v, l, g, a, d_in, r, 0)
    _expand(u, h, None, b, r, 0, r, u_tiled)
    return a, b


def gemm(
    x2: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    dtype: torch.dtype,
    u_tiled: bool = False,
) -> None:
    """y (M, d_out, any row stride) = the packed product of x2 (M, d_in) for one layer, the GEMMs in
    ``dtype`` (the activations' dtype; fp32 under Triton's interpreter, which rounds bf16 by truncation)."""
    a, b = expanded_factors(u, v, h, l, g, dtype, u_tiled)
    t = torch.mm(x2.to(dtype), a.T)
    # cuBLAS writes through y's row stride (a column slice of a grouped call's output is no copy)
    out = y if y.dtype == dtype else torch.empty(y.shape, dtype=dtype, device=y.device)
    if bias is None:
        torch.mm(t, b.T, out=out)
    else:
        torch.addmm(bias.to(dtype), t, b.T, out=out)
    if out is not y:
        y.copy_(out)
