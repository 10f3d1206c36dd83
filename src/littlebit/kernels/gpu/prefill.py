"""Triton tensor-core kernels for many tokens (prompts, evaluation, serving batches).

Two GEMM-shaped launches, signs decoded to +-1 in registers (``_tensorcore._sign_tile``) as the
``tl.dot`` operand, never a +-1 matrix in memory:

- stage 1, grid (P * row blocks, splits of d_in, token blocks): t = l * S_V^T (g * x) for a tile of
  latents x tokens; t is stored whole in the MMA operands' dtype, or, with d_in split, as fp32 partial
  sums, one buffer per split: plain stores (no atomics, no zeroed workspace), in the column order stage
  2's decoded signs take (``_pair_slot``), padding latents as zeros;
- stage 2, grid (output blocks, token blocks): y = sum_p h_p * S_U,p t_p + bias, both paths in one
  program.

Both loops are written so that their tiles go from memory to the MMA untouched: Triton then copies
them asynchronously through the software pipeline and keeps MMAs in flight while the next signs are
decoded (the compiled loops: ``benchmarks/dev/kernel_pipelining.py``). Stage 1 reads g * x from a
buffer one small launch writes before it (``_pf_scale_x_kernel``: each path's g applied, entries in the
order of the decoded signs' columns), and where d_in is split, a launch between the stages adds the
partial sums into one t (``_pf_sum_splits_kernel``). Forming g * x in stage 1's loop and adding the
splits in stage 2's, each such tile passing through registers and every MMA waited for, ran 1.05-2.6x
slower from 65 to 128 tokens (docs/kernels.md, "What the compiler makes of the inner loops").

d_in is split (up to 4 ways) only where the token and row blocks alone leave the GPU under
``prefill_waves`` programs per SM: few tokens, small ranks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from littlebit.kernels.gpu._tensorcore import (
    TL_DTYPES,
    _dot,
    _pair_slot,
    _sign_tile,
    _tc_u_body,
    _v_program,
    _v_words,
    sign_ones,
)
from littlebit.kernels.gpu.config import KernelConfig
from littlebit.kernels.gpu.tiles import _split, cdiv

# tokens and entries per program of ``_pf_scale_x_kernel``
_SCALE_TOKENS, _SCALE_ENTRIES = 16, 256
_SUM_BLOCK = 1024  # entries of t per program of ``_pf_sum_splits_kernel``


@triton.jit
def _pf_v_kernel(
    xg_ptr, v_ptr, l_ptr, t_ptr, M, R, W_in, stride_xm, Rp, n_rb, chunk, split_stride, ones,
    P: tl.constexpr, BR: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, OP_DT: tl.constexpr,
):  # fmt: skip
    """Stage 1: partial t of rows ``BR`` x tokens ``BM`` over one split of d_in, from
    ``_pf_scale_x_kernel``'s (P, M, stride_xm) g * x in the decoded columns' order."""
    pid0, split, pid2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, rows, toks, k_lo, k_hi = _v_program(pid0, split, pid2, n_rb, chunk, W_in, BR, BM)
    tok_ok = toks < M
    # A program's first token in 64-bit arithmetic (P * tokens * d_in passes 2^31 on long 70B prompts),
    # offsets inside its tile in 32, which hold half the registers that 64-bit ones for every element do.
    t0, lt = (pid2 * BM).to(tl.int64), tl.arange(0, BM)
    acc = tl.zeros((BR, BM), tl.float32)
    for k0 in range(k_lo, k_hi, BKW):
        w = _v_words(v_ptr, p, rows, R, W_in, k0, k_hi, BKW)
        e = k0 * 32 + tl.arange(0, BKW * 32)
        # straight from memory to the MMA: copied asynchronously, an MMA kept in flight
        xv = tl.load(
            xg_ptr + (p * M + t0) * stride_xm + lt[None, :] * stride_xm + e[:, None],
            mask=(e < k_hi * 32)[:, None] & tok_ok[None, :],
            other=0.0,
        )
        acc = _dot(_sign_tile(w, ones, BR, BKW, OP_DT), xv, acc, OP_DT)
    # rows past R (masked words decode to -1) get l = 0: t's padding latents are stored as zeros
    lv = tl.load(l_ptr + p * R + rows, mask=rows < R, other=0.0).to(tl.float32)
    base = t_ptr + split.to(tl.int64) * split_stride + t0 * P * Rp
    dst = base + (lt[None, :] * P + p) * Rp + _pair_slot(rows)[:, None]
    tl.store(dst, (acc * lv[:, None]).to(t_ptr.dtype.element_ty), mask=(rows < Rp)[:, None] & tok_ok[None, :])


@triton.jit
def _pf_scale_x_kernel(
    x_ptr, g_ptr, xg_ptr, M, d_in, Kp, stride_xm, BM: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """xg[p, m, _pair_slot(e)] = g[p, e] * x[m, e], rounded once to xg's dtype from the fp32 product;
    zeros from d_in up to Kp (the last word's padding). Grid (token blocks, entry blocks, P); ``BE`` a
    multiple of 32, so each entry's slot is inside its own block."""
    pid_m, pid_e, p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, lt = (pid_m * BM).to(tl.int64), tl.arange(0, BM)  # 64-bit base, 32-bit offsets (``_pf_v_kernel``)
    toks = pid_m * BM + lt
    e = pid_e * BE + tl.arange(0, BE)
    tok_ok = toks < M
    e_ok = e < d_in
    mask = tok_ok[:, None] & e_ok[None, :]
    xv = tl.load(x_ptr + t0 * stride_xm + lt[:, None] * stride_xm + e[None, :], mask=mask, other=0.0)
    gv = tl.load(g_ptr + p * d_in + e, mask=e_ok, other=0.0)
    val = xv.to(tl.float32) * gv.to(tl.float32)[None, :]
    dst = xg_ptr + (p * M + t0) * Kp + lt[:, None] * Kp + _pair_slot(e)[None, :]
    tl.store(dst, val.to(xg_ptr.dtype.element_ty), mask=tok_ok[:, None] & (e < Kp)[None, :])


@triton.jit
def _pf_sum_splits_kernel(t_ptr, out_ptr, n, split_stride, N_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = the sum of stage 1's ``N_SPLIT`` fp32 partials of t[i], in a fixed order, rounded once to
    out's dtype: stage 2 then reads one t in the operands' dtype and its loop stays pipelined."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = tl.load(t_ptr + i, mask=ok, other=0.0)
    for s in tl.static_range(1, N_SPLIT):
        acc += tl.load(t_ptr + s * split_stride + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pf_u_kernel(
    t_ptr, u_ptr, h_ptr, b_ptr, y_ptr, M, d_out, W_r, Rp, stride_ym, ones,
    P: tl.constexpr, BO: tl.constexpr, BKW: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
    OP_DT: tl.constexpr, TILED: tl.constexpr,
):  # fmt: skip
    """Stage 2: y for output rows ``BO`` x tokens ``BM`` from one t; S_U in tile order with ``TILED``."""
    _tc_u_body(
        t_ptr, u_ptr, h_ptr, b_ptr, y_ptr, tl.program_id(0), tl.program_id(1), M, d_out, W_r, Rp, stride_ym,
        ones, P, BO, BKW, BM, HAS_BIAS, OP_DT, False, TILED,
    )  # fmt: skip


def prefill_tile(
    M: int, r: int, W_in: int, d_out: int, P: int, cfg: KernelConfig, sms: int
) -> tuple[int, ...]:
    """(tokens per program, rows per stage-1 program, output rows per stage-2 program, words per step,
    warps, words per split of d_in, splits). Square 128 tiles from 1024 latents (all paths); below, 64
    latent rows and token blocks of 64 with 4 warps; token blocks of 64 also where 128 would leave the
    stage-2 grid under ``prefill_waves`` per SM. On the H200 sweep (``benchmarks/prefill.py --quick``)
    the 64-token, 4-warp tile took 352 against 551 µs (8192x28672, 0.1 BPW, 2048 tokens) and 20.1
    against 31.0 µs (4096x11008, 0.1 BPW, 128 tokens); at 1.0 BPW the 128 square tile was the best of
    the seven tried (490 µs, 4096x11008, 2048 tokens)."""
    target = int(cfg.prefill_waves * sms)
    bo = cfg.prefill_out or 128
    br = cfg.prefill_rows or (128 if P * r >= 1024 else 64)
    wide = br == 128 and cdiv(M, 128) * cdiv(d_out, bo) >= target
    bm = cfg.prefill_tokens or (128 if wide else 64)
    words = cfg.prefill_words or 2
    warps = cfg.prefill_warps or (8 if bm >= 128 else 4)
    programs = P * cdiv(32 * cdiv(r, 32), br) * cdiv(M, bm)
    # at most 4 splits: each is an fp32 partial t written, then read by the launch that adds them
    chunk, n_split = _split(W_in, words, programs, min(target, 4 * programs))
    return bm, br, bo, words, warps, chunk, n_split


def prefill(
    x2: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    cfg: KernelConfig,
    sms: int,
    dtype: torch.dtype,
    u_tiled: bool,
) -> None:
    """y (M, d_out, any row stride) = the packed product of x2 (M, d_in) for one layer; ``dtype`` is
    the MMA operands' dtype."""
    M, d_in = x2.shape
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    bm, br, bo, words, warps, chunk, n_split = prefill_tile(M, r, W_in, d_out, P, cfg, sms)
    Rp = 32 * W_r
    n_rb, n_mb = cdiv(Rp, br), cdiv(M, bm)  # row blocks cover the padding latents too
    # t in the operand dtype when whole (as the reference rounds it; half the bytes stage 2 reads per
    # step), fp32 partial sums when split
    op_dt = TL_DTYPES[dtype]
    t_dtype = torch.float32 if n_split > 1 else dtype
    t = torch.empty((n_split, M, P, Rp), dtype=t_dtype, device=x2.device)
    split_stride = M * P * Rp
    stages = cfg.prefill_stages or 3
    ones = sign_ones(op_dt)
    Kp = 32 * W_in
    xg = torch.empty((P, M, Kp), dtype=dtype, device=x2.device)
    _pf_scale_x_kernel[(cdiv(M, _SCALE_TOKENS), cdiv(Kp, _SCALE_ENTRIES), P)](
        x2, g, xg, M, d_in, Kp, x2.stride(0), BM=_SCALE_TOKENS, BE=_SCALE_ENTRIES, num_warps=4,
    )  # fmt: skip
    _pf_v_kernel[(P * n_rb, n_split, n_mb)](
        xg, v, l, t, M, r, W_in, Kp, Rp, n_rb, chunk, split_stride, ones,
        P=P, BR=br, BKW=words, BM=bm, OP_DT=op_dt, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if n_split > 1:
        whole = torch.empty((M, P, Rp), dtype=dtype, device=x2.device)
        _pf_sum_splits_kernel[(cdiv(split_stride, _SUM_BLOCK),)](
            t, whole, split_stride, split_stride, N_SPLIT=n_split, BLOCK=_SUM_BLOCK, num_warps=4
        )
        t = whole
    _pf_u_kernel[(cdiv(d_out, bo), n_mb)](
        t, u, h, y if bias is None else bias, y, M, d_out, W_r, Rp, y.stride(0), ones,
        P=P, BO=bo, BKW=words, BM=bm, HAS_BIAS=bias is not None, OP_DT=op_dt, TILED=u_tiled,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
