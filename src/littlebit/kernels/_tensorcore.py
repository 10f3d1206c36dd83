"""Triton tensor-core kernels (a few to 64 tokens): signs decoded to +-1 in registers feed ``tl.dot``.

Stage 1 reads g*x in the operand dtype, prepared once per call by ``_tc_prep_kernel`` in the column
order ``_sign_tile`` produces; stage 1 adds into an fp32 ``t`` (split over d_in, atomics) that stage 2
reads in the same order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sign_tile(w, BR: tl.constexpr, BKW: tl.constexpr, DT: tl.constexpr):
    """(BR, BKW) words -> (BR, 32 * BKW) +-1 in DT. Column 32k + 2i + j holds bit i + 16j of word k.

    That order comes from building fp16 pairs: ~w shifted left by 15 - i has bits i and i+16 at the two
    half-word sign positions, so one and/or turns them into the pair (+-1, +-1). The caller permutes
    the other operand's rows to match (``_pair_order``).
    """
    if DT == tl.float16:
        sh = (~w)[:, :, None] << (15 - tl.arange(0, 16))[None, None, :]
        pair = (sh & -2147450880) | 0x3C003C00  # sign bits 0x80008000 over fp16 1.0 in both halves
        lo = pair.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        s = tl.join(lo, hi)
    else:
        sh = w[:, :, None] >> tl.arange(0, 16)[None, None, :]
        s = tl.join(tl.where((sh & 1) != 0, 1.0, -1.0), tl.where((sh & 65536) != 0, 1.0, -1.0)).to(DT)
    return tl.reshape(s, (BR, BKW * 32))


@triton.jit
def _pair_order(q):
    """Source offset within a word's 32 entries of column q of ``_sign_tile``."""
    return (q // 32) * 32 + (q % 32) // 2 + 16 * (q % 2)


@triton.jit
def _dot(a, b, acc, OP_DT: tl.constexpr):
    if OP_DT == tl.float32:
        res = tl.dot(a, b, acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc)
    return res


@triton.jit
def _pair_slot(j):
    """Inverse of ``_pair_order``: the column of ``_sign_tile`` that entry j of a word row lands in."""
    return (j // 32) * 32 + 2 * (j % 16) + (j % 32) // 16


@triton.jit
def _tc_prep_kernel(
    x_ptr,
    g_ptr,
    xg_ptr,
    t_ptr,
    M,
    d_in,
    Kp,
    stride_xm,
    n_zero,
    P: tl.constexpr,
    BK: tl.constexpr,
    ZB: tl.constexpr,
):
    # g*x once per call in the operand dtype and in _sign_tile's column order, instead of once per
    # row block; zero t for the atomics.
    pk = tl.program_id(0)
    m = tl.program_id(1)
    q = pk * BK + tl.arange(0, BK)
    e = _pair_order(q)
    ok = e < d_in
    xv = tl.load(x_ptr + m * stride_xm + e, mask=ok, other=0.0).to(tl.float32)
    for p in tl.static_range(P):
        gv = tl.load(g_ptr + p * d_in + e, mask=ok, other=0.0).to(tl.float32)
        tl.store(xg_ptr + (p * M + m) * Kp + q, (xv * gv).to(xg_ptr.dtype.element_ty), mask=q < Kp)
    z = (m * tl.num_programs(0) + pk) * ZB + tl.arange(0, ZB)
    tl.store(t_ptr + z, tl.zeros((ZB,), tl.float32), mask=z < n_zero)


@triton.jit
def _tc_v_kernel(
    xg_ptr,
    v_ptr,
    l_ptr,
    t_ptr,
    M,
    R,
    W_in,
    Rp,
    n_rb,
    chunk,
    P: tl.constexpr,
    BR: tl.constexpr,
    BKW: tl.constexpr,
    BM: tl.constexpr,
    OP_DT: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid // n_rb
    rows = (pid % n_rb) * BR + tl.arange(0, BR)
    row_ok = rows < R
    toks = tl.program_id(2) * BM + tl.arange(0, BM)
    tok_ok = toks < M
    k_lo = tl.program_id(1) * chunk
    k_hi = tl.minimum(k_lo + chunk, W_in)
    Kp = W_in * 32
    acc = tl.zeros((BR, BM), tl.float32)
    for k0 in range(k_lo, k_hi, BKW):
        cols = k0 + tl.arange(0, BKW)
        w = tl.load(
            v_ptr + (p * R + rows)[:, None] * W_in + cols[None, :],
            mask=row_ok[:, None] & (cols < k_hi)[None, :],
            other=0,
        )
        e = k0 * 32 + tl.arange(0, BKW * 32)
        xg = tl.load(
            xg_ptr + (p * M + toks[None, :]) * Kp + e[:, None],
            mask=(e < k_hi * 32)[:, None] & tok_ok[None, :],
            other=0.0,
        )
        acc = _dot(_sign_tile(w, BR, BKW, OP_DT), xg, acc, OP_DT)
    lv = tl.load(l_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
    dst = t_ptr + (toks[None, :] * P + p) * Rp + _pair_slot(rows)[:, None]
    tl.atomic_add(dst, acc * lv[:, None], mask=row_ok[:, None] & tok_ok[None, :])


@triton.jit
def _tc_u_kernel(
    t_ptr,
    u_ptr,
    h_ptr,
    b_ptr,
    y_ptr,
    M,
    d_out,
    W_r,
    Rp,
    stride_ym,
    P: tl.constexpr,
    BO: tl.constexpr,
    BKW: tl.constexpr,
    BM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OP_DT: tl.constexpr,
):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    row_ok = rows < d_out
    toks = tl.program_id(1) * BM + tl.arange(0, BM)
    tok_ok = toks < M
    y = tl.zeros((BO, BM), tl.float32)
    for p in tl.static_range(P):
        acc = tl.zeros((BO, BM), tl.float32)
        for k0 in range(0, W_r, BKW):
            cols = k0 + tl.arange(0, BKW)
            w = tl.load(
                u_ptr + (p * d_out + rows)[:, None] * W_r + cols[None, :],
                mask=row_ok[:, None] & (cols < W_r)[None, :],
                other=0,
            )
            e = k0 * 32 + tl.arange(0, BKW * 32)
            tv = tl.load(
                t_ptr + (toks[None, :] * P + p) * Rp + e[:, None],
                mask=(e < Rp)[:, None] & tok_ok[None, :],
                other=0.0,
            )
            acc = _dot(_sign_tile(w, BO, BKW, OP_DT), tv.to(OP_DT), acc, OP_DT)
        hv = tl.load(h_ptr + p * d_out + rows, mask=row_ok, other=0.0).to(tl.float32)
        y += acc * hv[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + toks[None, :] * stride_ym + rows[:, None]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & tok_ok[None, :])


# ---- host side --------------------------------------------------------------------------------------
