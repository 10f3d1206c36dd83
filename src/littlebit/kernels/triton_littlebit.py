"""Triton kernels for the packed LittleBit product (math and layout: ``littlebit.ops``, ``.packing``).

Signs are read as packed words and decoded in registers; no unpacked matrix ever reaches memory.

1-4 tokens (decoding) are matrix-vector products over bits: the cost is turning bits into signed sums,
so tensor cores do not help. Three launches:

1. ``_prep``: g_p * x for every path, stored *bit-major* (entry 32k+b at row b, column k) so the values
   that meet bit b of a tile of words are one contiguous load; it also zeroes ``t``.
2. ``_gemv_v``: t = l * S_V^T (g*x), split over d_in so that small ranks still fill the GPU; partial sums
   are added into ``t`` (fp32, bit-major as well) with atomics.
3. ``_gemv_u``: y = sum_p h_p * S_U,p t_p (+ bias); r is small, so a program reduces whole rows.

5-64 tokens use tensor cores: a tile of words becomes +-1 in the activation dtype in registers and
feeds ``tl.dot``; same split-and-atomics structure, with ``t`` in natural order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64
GEMV_MAX_TOKENS = 4


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes; the defaults were tuned on an H100 (benchmarks/KERNELS_NOTES.md)."""

    rows_v: int = 32  # GEMV stage 1: rows of S_V^T per program
    words_v: int = 32  # GEMV stage 1: words of each row per loop step
    rows_u: int = 64  # GEMV stage 2: output rows per program, halved while the grid is too small
    words_u: int = 0  # GEMV stage 2: words per step; 0 picks a width that wastes few lanes on W_r
    warps: int = 4
    waves: float = 4.0  # programs per SM aimed for when splitting d_in
    tc_rows: int = 64
    tc_words: int = 2
    asm: bool | None = None  # fp16x2 PTX bit decoding for fp16 GEMV; None: whenever it can run


DEFAULT_CONFIG = KernelConfig()
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---- fp16x2 decoding (GPU only) ---------------------------------------------------------------------
# Bits b and b+16 of ~w, shifted to the two fp16 sign positions, flip the signs of a packed pair of
# values with one lop3; an add.f16x2 then accumulates both. 1.5 instructions per bit instead of >= 2.


@triton.jit
def _pack_half2(lo, hi):
    return tl.inline_asm_elementwise(
        "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _signed_add_half2(shifted_not_w, pair, acc2):
    return tl.inline_asm_elementwise(
        "{ .reg .b32 m, v; mov.b32 m, 0x80008000; lop3.b32 v, $1, m, $2, 0x6A; add.rn.f16x2 $0, $3, v; }",
        "=r,r,r,r",
        [shifted_not_w, pair, acc2],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _half2_sum(acc2):
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .f32 a, b; mov.b32 {lo, hi}, $1; "
        "cvt.f32.f16 a, lo; cvt.f32.f16 b, hi; add.f32 $0, a, b; }",
        "=f,r",
        [acc2],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


# ---- GEMV path (1-4 tokens) -------------------------------------------------------------------------


@triton.jit
def _rows_dot(w_ptrs, row_ok, vec_ptrs, tok_ok, vec_stride, k_lo, k_hi, TOK, BR, BKW, ASM):
    """(TOK, BR) fp32: sum over words [k_lo, k_hi) of sign(row, i) * vec(tok, i).

    ``w_ptrs`` (BR, 1) points at each row's word 0; ``vec_ptrs`` (TOK, 1) at each token's bit-major
    vector, whose row b (values meeting bit b of each word) starts ``b * vec_stride`` further on.
    """
    kk = tl.arange(0, BKW)
    acc = tl.zeros((TOK, BR, BKW), tl.float32)
    tot = tl.zeros((TOK, BKW), tl.float32)
    cols = k_lo + kk
    w = tl.load(w_ptrs + cols[None, :], mask=row_ok[:, None] & (cols < k_hi)[None, :], other=0)
    for k0 in range(k_lo, k_hi, BKW):
        cols = k0 + kk
        vmask = tok_ok[:, None] & (cols < k_hi)[None, :]
        # The next tile is requested before this one is decoded, so a load is always in flight.
        nxt = cols + BKW
        w_next = tl.load(w_ptrs + nxt[None, :], mask=row_ok[:, None] & (nxt < k_hi)[None, :], other=0)
        if ASM:
            nw = ~w
            acc2 = tl.zeros((TOK, BR, BKW), tl.int32)
            for i in tl.static_range(16):
                lo = tl.load(vec_ptrs + i * vec_stride + cols[None, :], mask=vmask, other=0.0)
                hi = tl.load(vec_ptrs + (i + 16) * vec_stride + cols[None, :], mask=vmask, other=0.0)
                acc2 = _signed_add_half2((nw << (15 - i))[None, :, :], _pack_half2(lo, hi)[:, None, :], acc2)
            # fp16 sums of 32 terms only; words are added in fp32.
            acc += _half2_sum(acc2)
        else:
            # Add the values under set bits only; 2 * that - the total is the signed sum, which lets the
            # compiler use a predicated add per bit instead of a select and an add.
            for b in tl.static_range(32):
                vb = tl.load(vec_ptrs + b * vec_stride + cols[None, :], mask=vmask, other=0.0)
                if b == 31:
                    bit = w < 0
                else:
                    bit = (w & (1 << b)) != 0
                acc = tl.where(bit[None, :, :], acc + vb[:, None, :], acc)
                tot += vb
        w = w_next
    if ASM:
        res = tl.sum(acc, axis=2)
    else:
        res = 2.0 * tl.sum(acc, axis=2) - tl.sum(tot, axis=1)[:, None]
    return res


@triton.jit
def _prep_kernel(
    x_ptr,
    g_ptr,
    gx_ptr,
    t_ptr,
    d_in,
    W_in,
    stride_xm,
    n_zero,
    P: tl.constexpr,
    BW: tl.constexpr,
    ZB: tl.constexpr,
):
    pw = tl.program_id(0)
    m = tl.program_id(1)
    words = pw * BW + tl.arange(0, BW)
    bits = tl.arange(0, 32)
    idx = words[:, None] * 32 + bits[None, :]
    ok = idx < d_in
    xv = tl.load(x_ptr + m * stride_xm + idx, mask=ok, other=0.0).to(tl.float32)
    for p in tl.static_range(P):
        gv = tl.load(g_ptr + p * d_in + idx, mask=ok, other=0.0).to(tl.float32)
        dst = gx_ptr + ((m * P + p) * 32 + bits[None, :]) * W_in + words[:, None]
        tl.store(dst, xv * gv, mask=(words < W_in)[:, None])
    z = (m * tl.num_programs(0) + pw) * ZB + tl.arange(0, ZB)
    tl.store(t_ptr + z, tl.zeros((ZB,), tl.float32), mask=z < n_zero)


@triton.jit
def _gemv_v_kernel(
    gx_ptr,
    v_ptr,
    l_ptr,
    t_ptr,
    M,
    R,
    W_in,
    W_r,
    n_rb,
    chunk,
    P: tl.constexpr,
    TOK: tl.constexpr,
    BR: tl.constexpr,
    BKW: tl.constexpr,
    ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid // n_rb
    rows = (pid % n_rb) * BR + tl.arange(0, BR)
    row_ok = rows < R
    toks = tl.arange(0, TOK)
    tok_ok = toks < M
    k_lo = tl.program_id(1) * chunk
    k_hi = tl.minimum(k_lo + chunk, W_in)
    w_ptrs = v_ptr + (p * R + rows)[:, None] * W_in
    vec_ptrs = gx_ptr + ((toks * P + p) * 32)[:, None] * W_in
    part = _rows_dot(w_ptrs, row_ok, vec_ptrs, tok_ok, W_in, k_lo, k_hi, TOK, BR, BKW, ASM)
    lv = tl.load(l_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
    dst = t_ptr + ((toks * P + p) * 32)[:, None] * W_r + ((rows % 32) * W_r + rows // 32)[None, :]
    tl.atomic_add(dst, part * lv[None, :], mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _gemv_u_kernel(
    t_ptr,
    u_ptr,
    h_ptr,
    b_ptr,
    y_ptr,
    M,
    d_out,
    W_r,
    stride_ym,
    P: tl.constexpr,
    TOK: tl.constexpr,
    BO: tl.constexpr,
    BKW: tl.constexpr,
    ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BO + tl.arange(0, BO)
    row_ok = rows < d_out
    toks = tl.arange(0, TOK)
    tok_ok = toks < M
    y = tl.zeros((TOK, BO), tl.float32)
    for p in tl.static_range(P):
        w_ptrs = u_ptr + (p * d_out + rows)[:, None] * W_r
        vec_ptrs = t_ptr + ((toks * P + p) * 32)[:, None] * W_r
        s = _rows_dot(w_ptrs, row_ok, vec_ptrs, tok_ok, W_r, 0, W_r, TOK, BO, BKW, ASM)
        hv = tl.load(h_ptr + p * d_out + rows, mask=row_ok, other=0.0).to(tl.float32)
        y += s * hv[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + toks[:, None] * stride_ym + rows[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])


# ---- tensor-core path (5-64 tokens) -----------------------------------------------------------------


@triton.jit
def _sign_tile(w, BR: tl.constexpr, BKW: tl.constexpr, DT: tl.constexpr):
    """(BR, BKW) words -> (BR, 32 * BKW) +-1 in DT, entry 32k + b from bit b of word k."""
    bits = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(tl.where(bits != 0, 1.0, -1.0).to(DT), (BR, BKW * 32))


@triton.jit
def _dot(a, b, acc, OP_DT: tl.constexpr):
    if OP_DT == tl.float32:
        res = tl.dot(a, b, acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc)
    return res


@triton.jit
def _tc_v_kernel(
    x_ptr,
    g_ptr,
    v_ptr,
    l_ptr,
    t_ptr,
    M,
    d_in,
    R,
    W_in,
    Rp,
    stride_xm,
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
    e_hi = tl.minimum(k_hi * 32, d_in)
    acc = tl.zeros((BR, BM), tl.float32)
    for k0 in range(k_lo, k_hi, BKW):
        cols = k0 + tl.arange(0, BKW)
        w_ptrs = v_ptr + (p * R + rows)[:, None] * W_in + cols[None, :]
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (cols < k_hi)[None, :], other=0)
        e = k0 * 32 + tl.arange(0, BKW * 32)
        e_ok = e < e_hi
        xv = tl.load(
            x_ptr + toks[None, :] * stride_xm + e[:, None], mask=e_ok[:, None] & tok_ok[None, :], other=0.0
        )
        gv = tl.load(g_ptr + p * d_in + e, mask=e_ok, other=0.0)
        xg = (xv.to(tl.float32) * gv.to(tl.float32)[:, None]).to(OP_DT)
        acc = _dot(_sign_tile(w, BR, BKW, OP_DT), xg, acc, OP_DT)
    lv = tl.load(l_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
    dst = t_ptr + (toks[None, :] * P + p) * Rp + rows[:, None]
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


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _words_per_step(w: int) -> int:
    """A power-of-two step over ``w`` words that leaves few masked lanes, the widest among near-ties."""
    best, best_eff = 1, 0.0
    for step in (1, 2, 4, 8, 16, 32):
        eff = w / (triton.cdiv(w, step) * step)
        if eff > best_eff + 0.05 or (eff >= best_eff - 0.05 and step > best):
            best, best_eff = step, max(eff, best_eff)
    return best


def _split(n_words: int, step: int, programs: int, target: int) -> tuple[int, int]:
    """Split ``n_words`` in chunks (multiples of ``step``) so that ``programs`` per chunk reach ``target``."""
    n_steps = triton.cdiv(n_words, step)
    want = max(1, min(n_steps, triton.cdiv(target, max(programs, 1))))
    chunk = triton.cdiv(n_steps, want) * step
    return chunk, triton.cdiv(n_words, chunk)


def _warps(elements: int, cap: int) -> int:
    """Warps for a tile of int32 words read 4 per thread, so that no thread duplicates another's work."""
    return max(1, min(cap, _pow2_at_least(max(1, elements // 128))))


def _check(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor, h, l, g) -> None:
    if u_signs.dtype != torch.int32 or v_signs.dtype != torch.int32:
        raise TypeError("packed signs must be int32")
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    if x.shape[-1] != d_in or v_signs.shape != (P, r, triton.cdiv(d_in, 32)):
        raise ValueError(f"v_signs {tuple(v_signs.shape)} does not match d_in={d_in}, r={r}, P={P}")
    if u_signs.shape != (P, d_out, triton.cdiv(r, 32)):
        raise ValueError(f"u_signs {tuple(u_signs.shape)} does not match d_out={d_out}, r={r}, P={P}")


def littlebit_linear_triton(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The packed product on the GPU (or on CPU tensors under ``TRITON_INTERPRET=1``); any token count."""
    cfg = config or DEFAULT_CONFIG
    _check(x, u_signs, v_signs, h, l, g)
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, d_out), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, d_out)
    u, v = u_signs.contiguous(), v_signs.contiguous()
    h, l, g = h.contiguous(), l.contiguous(), g.contiguous()
    b = bias.contiguous() if bias is not None else y
    W_in, W_r = v.shape[-1], u.shape[-1]
    sms = 4 if _interpreting() or not x.is_cuda else _num_sms(x.device.index or 0)
    target = int(cfg.waves * sms)
    if M <= GEMV_MAX_TOKENS:
        asm = cfg.asm
        if asm is None:
            asm = x.dtype == torch.float16
        asm = bool(asm) and x.is_cuda and not _interpreting()
        tok = _pow2_at_least(M)
        gx = torch.empty((M, P, 32, W_in), dtype=torch.float32, device=x.device)
        t = torch.empty((M, P, 32, W_r), dtype=torch.float32, device=x.device)
        bw = min(32, _pow2_at_least(W_in))
        n_pw = triton.cdiv(W_in, bw)
        zb = _pow2_at_least(triton.cdiv(t.numel(), n_pw * M))
        _prep_kernel[(n_pw, M)](x2, g, gx, t, d_in, W_in, x2.stride(0), t.numel(), P=P, BW=bw, ZB=zb)
        br = min(cfg.rows_v, max(8, _pow2_at_least(r)))
        bkw = min(cfg.words_v, _pow2_at_least(W_in))
        n_rb = triton.cdiv(r, br)
        chunk, n_split = _split(W_in, bkw, P * n_rb, target)
        _gemv_v_kernel[(P * n_rb, n_split)](
            gx, v, l, t, M, r, W_in, W_r, n_rb, chunk,
            P=P, TOK=tok, BR=br, BKW=bkw, ASM=asm, num_warps=_warps(br * bkw, cfg.warps),
        )  # fmt: skip
        bkw_u = cfg.words_u or _words_per_step(W_r)
        bo = cfg.rows_u
        while bo > 8 and triton.cdiv(d_out, bo) < target // 2:
            bo //= 2
        _gemv_u_kernel[(triton.cdiv(d_out, bo),)](
            t, u, h, b, y, M, d_out, W_r, y.stride(0),
            P=P, TOK=tok, BO=bo, BKW=bkw_u, ASM=asm, HAS_BIAS=bias is not None,
            num_warps=_warps(bo * bkw_u, cfg.warps),
        )  # fmt: skip
        return y.reshape(*lead, d_out)
    bm = min(64, max(16, _pow2_at_least(M)))
    # The interpreter rounds to bf16 by truncation, a bias that piles up over a sum; it computes the
    # bf16 products in fp32 instead, which still checks everything but the rounding.
    op_dt = tl.float32 if _interpreting() and x.dtype == torch.bfloat16 else _TL_DTYPES[x.dtype]
    n_mb = triton.cdiv(M, bm)
    Rp = 32 * W_r
    t = torch.zeros((M, P, Rp), dtype=torch.float32, device=x.device)
    br = cfg.tc_rows
    n_rb = triton.cdiv(r, br)
    chunk, n_split = _split(W_in, cfg.tc_words, P * n_rb * n_mb, target)
    _tc_v_kernel[(P * n_rb, n_split, n_mb)](
        x2, g, v, l, t, M, d_in, r, W_in, Rp, x2.stride(0), n_rb, chunk,
        P=P, BR=br, BKW=cfg.tc_words, BM=bm, OP_DT=op_dt, num_warps=4,
    )  # fmt: skip
    bo = cfg.tc_rows
    while bo > 16 and triton.cdiv(d_out, bo) * n_mb < target // 2:
        bo //= 2
    _tc_u_kernel[(triton.cdiv(d_out, bo), n_mb)](
        t, u, h, b, y, M, d_out, W_r, Rp, y.stride(0),
        P=P, BO=bo, BKW=cfg.tc_words, BM=bm, HAS_BIAS=bias is not None, OP_DT=op_dt,
        num_warps=4,
    )  # fmt: skip
    return y.reshape(*lead, d_out)


def accepts(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> bool:
    """CUDA tensors in fp16/bf16 with int32 words and at most ``MAX_TOKENS`` tokens."""
    return (
        x.is_cuda
        and u_signs.is_cuda
        and v_signs.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and u_signs.dtype == torch.int32
        and v_signs.dtype == torch.int32
        and x.shape[-1] > 0
        and x.numel() // x.shape[-1] <= MAX_TOKENS
    )
