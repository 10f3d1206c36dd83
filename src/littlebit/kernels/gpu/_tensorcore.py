"""Triton tensor-core kernels (a few to 64 tokens): signs decoded to +-1 in registers feed ``tl.dot``.

Stage 1 forms g*x per step from x and g (in natural order, so the loads stay contiguous) and permutes
it in registers to the column order ``_sign_tile`` produces; it adds into an fp32 ``t`` (split over
d_in, atomics) that stage 2 reads in the same order. Two launches (``_tc_v_kernel``, ``_tc_u_kernel``;
``t`` zero between calls, zeroed again by the last stage-2 program, ``_release_t``). Stage 1's
atomics are relaxed: the default (acq_rel) made every element an ``atom.acq_rel`` and cost ~11 µs at
8192x28672, batch 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from littlebit.kernels.gpu._gemv import _release_t
from littlebit.kernels.gpu._sync import _pdl_launch_next, _pdl_wait

# the Triton dtype of MMA operands in each torch dtype
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def sign_ones(dt: tl.dtype) -> int:
    """The bits of the pair (1.0, 1.0) in the 16-bit operand dtype ``dt`` (0 for fp32), which
    ``_sign_tile`` takes at run time."""
    return {tl.float16: 0x3C003C00, tl.bfloat16: 0x3F803F80}.get(dt, 0)


@triton.jit
def _sign_tile(w, ones, BR: tl.constexpr, BKW: tl.constexpr, DT: tl.constexpr):
    """(BR, BKW) words -> (BR, 32 * BKW) +-1 in DT. Column 32k + 2i + j holds bit i + 16j of word k.

    That order comes from building 16-bit pairs: w shifted left by 15 - i has bits i and i+16 at the
    two half-word sign positions, so inverting them, masking them and or-ing the 1.0 bits in gives the
    pair (+-1, +-1) (fp16 and bf16 alike, with their own 1.0). The other operand's rows take the same
    order: permuted in registers (``_to_pair_order``), or written in it (``prefill._pf_scale_x_kernel``,
    at ``_pair_slot``).

    ``ones`` is ``sign_ones(DT)``, a kernel argument rather than a literal: with the 1.0 bits in a
    register ptxas makes the inversion, the mask and the or one LOP3 a pair, after one shift (two
    literals took two LOP3s, and inverting each word first one more a word; the compiled loops:
    ``benchmarks/dev/kernel_pipelining.py``).
    """
    if DT == tl.float16 or DT == tl.bfloat16:
        sh = w[:, :, None] << (15 - tl.arange(0, 16))[None, None, :]
        # the inverted sign bits 0x80008000 over (1.0, 1.0)
        pair = (~sh & -2147450880) | ones
        lo = pair.to(tl.int16).to(DT, bitcast=True)
        hi = (pair >> 16).to(tl.int16).to(DT, bitcast=True)
        s = tl.join(lo, hi)
    else:
        sh = w[:, :, None] >> tl.arange(0, 16)[None, None, :]
        s = tl.join(tl.where((sh & 1) != 0, 1.0, -1.0), tl.where((sh & 65536) != 0, 1.0, -1.0)).to(DT)
    return tl.reshape(s, (BR, BKW * 32))


@triton.jit
def _to_pair_order(v, BKW: tl.constexpr, BM: tl.constexpr):
    """(32 * BKW, BM) in natural order -> the row order of ``_sign_tile``'s columns (32k + 2i + j: entry
    i + 16j of word k). Cheaper than loading in that order: the loads stay contiguous and the permute
    folds into the trip through shared memory that the MMA operand takes anyway."""
    return tl.reshape(tl.permute(tl.reshape(v, (BKW, 2, 16, BM)), (0, 2, 1, 3)), (BKW * 32, BM))


@triton.jit
def _dot(a, b, acc, OP_DT: tl.constexpr):
    if OP_DT == tl.float32:
        res = tl.dot(a, b, acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc)
    return res


@triton.jit
def _pair_slot(j):
    """The column of ``_sign_tile`` that entry j of a word row lands in."""
    return (j // 32) * 32 + 2 * (j % 16) + (j % 32) // 16


@triton.jit
def _v_program(pid0, split, pid2, n_rb, chunk, W_in, BR: tl.constexpr, BM: tl.constexpr):
    """A stage-1 program's path, latent rows, tokens and words [k_lo, k_hi) of d_in, for grid
    (P * n_rb, splits of d_in, token blocks)."""
    k_lo = split * chunk
    rows = (pid0 % n_rb) * BR + tl.arange(0, BR)
    return pid0 // n_rb, rows, pid2 * BM + tl.arange(0, BM), k_lo, tl.minimum(k_lo + chunk, W_in)


@triton.jit
def _v_words(v_ptr, p, rows, R, W_in, k0, k_hi, BKW: tl.constexpr):
    """Words k0 .. k0 + BKW of path p's S_V^T rows ``rows``; 0 past row R and word k_hi."""
    cols = k0 + tl.arange(0, BKW)
    return tl.load(
        v_ptr + (p * R + rows)[:, None] * W_in + cols[None, :],
        mask=(rows < R)[:, None] & (cols < k_hi)[None, :],
        other=0,
    )


@triton.jit
def _tc_v_body(
    x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, pid0, pid1, pid2, M, R, W_in, d_in, stride_xm, Rp, n_rb, chunk, ones,
    P: tl.constexpr, BR: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, OP_DT: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Stage 1 for program (pid0, pid1, pid2) of grid (P * n_rb, n_split, n_mb)."""
    p, rows, toks, k_lo, k_hi = _v_program(pid0, pid1, pid2, n_rb, chunk, W_in, BR, BM)
    row_ok = rows < R
    tok_ok = toks < M
    acc = tl.zeros((BR, BM), tl.float32)
    for k0 in range(k_lo, k_hi, BKW):
        w = _v_words(v_ptr, p, rows, R, W_in, k0, k_hi, BKW)
        e = k0 * 32 + tl.arange(0, BKW * 32)
        e_ok = (e < k_hi * 32) & (e < d_in)
        xv = tl.load(
            x_ptr + toks[None, :] * stride_xm + e[:, None], mask=e_ok[:, None] & tok_ok[None, :], other=0.0
        )
        gv = tl.load(g_ptr + p * d_in + e, mask=e_ok, other=0.0)
        # rounded once to the operand dtype, from the fp32 product
        xg = (xv.to(tl.float32) * gv.to(tl.float32)[:, None]).to(OP_DT)
        acc = _dot(_sign_tile(w, ones, BR, BKW, OP_DT), _to_pair_order(xg, BKW, BM), acc, OP_DT)
    _pdl_launch_next(PDL)
    lv = tl.load(l_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
    dst = t_ptr + (toks[None, :] * P + p) * Rp + _pair_slot(rows)[:, None]
    tl.atomic_add(dst, acc * lv[:, None], mask=row_ok[:, None] & tok_ok[None, :], sem="relaxed")


@triton.jit
def _u_offsets(p, rows, cols, d_out, W_r, TILED: tl.constexpr):
    """(rows, cols) offsets of words of path p's S_U: row order, or with ``TILED`` tile order
    (``packing.tile_order``: per 16-row tile, whole blocks of 8 words at lane 4 g + q, register
    2 j + hf, then the partial block row by row)."""
    if TILED:
        n_full = W_r // 8
        r16 = rows % 16
        base = ((p * d_out + rows - r16) * W_r)[:, None]
        w8 = cols % 8
        lane = (r16 % 8)[:, None] * 4 + (w8 // 2)[None, :]
        whole = base + (cols // 8 * 128)[None, :] + lane * 4 + (w8 % 2)[None, :] * 2 + (r16 // 8)[:, None]
        tail = base + n_full * 128 + r16[:, None] * (W_r - 8 * n_full) + (cols - 8 * n_full)[None, :]
        off = tl.where((cols < 8 * n_full)[None, :], whole, tail)
    else:
        off = (p * d_out + rows)[:, None] * W_r + cols[None, :]
    return off


@triton.jit
def _tc_u_body(
    t_ptr, u_ptr, h_ptr, b_ptr, y_ptr, pid0, pid1, M, d_out, W_r, Rp, stride_ym, ones,
    P: tl.constexpr, BO: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
    OP_DT: tl.constexpr, PDL: tl.constexpr, TILED: tl.constexpr,
):  # fmt: skip
    """Stage 2 for program (pid0, pid1) of grid (cdiv(d_out, BO), n_mb); S_U in tile order with
    ``TILED``; t (M, P, Rp), whole. In the operands' dtype (the prefill kernels) t goes from memory
    straight to the MMA, which then runs asynchronously; the 2-64-token kernels' fp32 t is converted."""
    rows = pid0 * BO + tl.arange(0, BO)
    row_ok = rows < d_out
    t0, lt = (pid1 * BM).to(tl.int64), tl.arange(0, BM)  # 64-bit base, 32-bit offsets (long prompts)
    toks = pid1 * BM + lt
    tok_ok = toks < M
    y = tl.zeros((BO, BM), tl.float32)
    for p in tl.static_range(P):
        acc = tl.zeros((BO, BM), tl.float32)
        for k0 in range(0, W_r, BKW):
            cols = k0 + tl.arange(0, BKW)
            w = tl.load(
                u_ptr + _u_offsets(p, rows, cols, d_out, W_r, TILED),
                mask=row_ok[:, None] & (cols < W_r)[None, :],
                other=0,
            )
            e = k0 * 32 + tl.arange(0, BKW * 32)
            tp = t_ptr + t0 * P * Rp + (lt[None, :] * P + p) * Rp + e[:, None]
            tv = tl.load(tp, mask=(e < Rp)[:, None] & tok_ok[None, :], other=0.0)
            acc = _dot(_sign_tile(w, ones, BO, BKW, OP_DT), tv.to(OP_DT), acc, OP_DT)
        hv = tl.load(h_ptr + p * d_out + rows, mask=row_ok, other=0.0).to(tl.float32)
        y += acc * hv[:, None]
    _pdl_launch_next(PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + t0 * stride_ym + lt[None, :] * stride_ym + rows[:, None]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & tok_ok[None, :])


@triton.jit
def _tc_v_kernel(
    x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, M, R, W_in, d_in, stride_xm, Rp, n_rb, chunk, ones,
    P: tl.constexpr, BR: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, OP_DT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Stage 1, grid (P * n_rb, n_split, n_mb)."""
    _pdl_wait(PDL)
    _tc_v_body(
        x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2), M, R, W_in,
        d_in, stride_xm, Rp, n_rb, chunk, ones, P, BR, BKW, BM, OP_DT, PDL,
    )  # fmt: skip


@triton.jit
def _tc_u_kernel(
    t_ptr, cnt_ptr, u_ptr, h_ptr, b_ptr, y_ptr, M, d_out, W_r, Rp, stride_ym, ones,
    P: tl.constexpr, BO: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
    OP_DT: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, TILED: tl.constexpr = False,
):  # fmt: skip
    """Stage 2, grid (cdiv(d_out, BO), n_mb); then ``_release_t``."""
    _pdl_wait(PDL)
    _tc_u_body(
        t_ptr, u_ptr, h_ptr, b_ptr, y_ptr, tl.program_id(0), tl.program_id(1), M, d_out, W_r, Rp, stride_ym,
        ones, P, BO, BKW, BM, HAS_BIAS, OP_DT, PDL, TILED,
    )  # fmt: skip
    _release_t(t_ptr, cnt_ptr, M * P * Rp, tl.num_programs(0) * tl.num_programs(1), ZB)
