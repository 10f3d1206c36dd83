"""The packed LittleBit product on the GPU with Triton (math and layout: ``littlebit.ops``, ``.packing``).

Signs are read as packed words and decoded in registers; no unpacked matrix ever reaches memory. Up to
``KernelConfig.gemv_max_tokens`` tokens go through the GEMV kernels (``_gemv``), more through the
tensor-core kernels (``_tensorcore``). Each path is three launches: a prep kernel (g*x in the layout the
first stage reads; zeroes the stage-1 accumulator), stage 1 (t = l * S_V^T (g*x), split over d_in with
fp32 atomics so small ranks still fill the GPU) and stage 2 (y = sum_p h_p * S_U,p t_p + bias).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._gemv import _gemv_u_kernel, _gemv_v_kernel, _prep_kernel
from ._tensorcore import _tc_prep_kernel, _tc_u_kernel, _tc_v_kernel

MAX_TOKENS = 64


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes; the defaults come from the H100 sweep in benchmarks/KERNELS_NOTES.md."""

    rows_v: int = 8  # GEMV stage 1: rows of S_V^T per thread (a thread owns one word column)
    words_v: int = 32  # GEMV stage 1: widest step over d_in, in words (lanes along the row)
    rows_u: int = 4  # GEMV stage 2: output rows per thread
    words_u: int = 0  # GEMV stage 2: step over r in words; 0: the whole row up to 32 words
    warps: int = 4
    waves: float = 8.0  # GEMV: programs per SM aimed for when splitting d_in
    tc_rows: int = 0  # tensor cores: rows per program; 0: 64 for ranks under 1024, else 128
    tc_words: int = 0  # tensor cores: words per step; 0: 2 with 64 rows, else 4
    tc_warps: int = 4
    tc_waves: float = 2.0
    asm: bool | None = None  # fp16x2 decoding in the GEMV; None: for fp16 on a GPU
    gemv_max_tokens: int = 1  # more tokens take the tensor-core path


DEFAULT_CONFIG = KernelConfig()
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _words_per_step(w: int, widest: int = 32) -> int:
    """A power-of-two step over ``w`` words that leaves few masked lanes, the widest among near-ties."""
    best, best_eff = 1, 0.0
    step = 1
    while step <= widest:
        eff = w / (triton.cdiv(w, step) * step)
        if eff > best_eff + 0.1 or (eff >= best_eff - 0.1 and step > best):
            best, best_eff = step, max(eff, best_eff)
        step *= 2
    return best


def _split(n_words: int, step: int, programs: int, target: int) -> tuple[int, int]:
    """Split ``n_words`` in chunks (multiples of ``step``) so that ``programs`` per chunk reach ``target``."""
    n_steps = triton.cdiv(n_words, step)
    want = max(1, min(n_steps, triton.cdiv(target, max(programs, 1))))
    chunk = triton.cdiv(n_steps, want) * step
    return chunk, triton.cdiv(n_words, chunk)


def _row_tile(rows: int, words: int, per_thread: int, warps: int) -> tuple[int, int]:
    """(rows per program, warps) for a tile whose lanes cover ``words`` columns, then rows."""
    lanes_on_rows = 32 // words
    block = per_thread * lanes_on_rows * warps
    while block > max(rows, lanes_on_rows) and warps > 1:  # small layers: fewer warps, not idle rows
        warps //= 2
        block //= 2
    return block, warps


def _check(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor, h, l, g) -> None:
    if u_signs.dtype != torch.int32 or v_signs.dtype != torch.int32:
        raise TypeError("packed signs must be int32")
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    if x.shape[-1] != d_in or v_signs.shape != (P, r, triton.cdiv(d_in, 32)):
        raise ValueError(f"v_signs {tuple(v_signs.shape)} does not match d_in={d_in}, r={r}, P={P}")
    if u_signs.shape != (P, d_out, triton.cdiv(r, 32)):
        raise ValueError(f"u_signs {tuple(u_signs.shape)} does not match d_out={d_out}, r={r}, P={P}")


def _gemv(x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    ptx = x2.is_cuda and not _interpreting()
    asm = (x2.dtype == torch.float16 and ptx) if cfg.asm is None else cfg.asm
    mode1, mode2 = (1, 2) if asm else (0, 0)
    tok = _pow2_at_least(M)
    # stage 1 tiles: lanes along d_in, rows_v rows per thread
    b1 = _words_per_step(W_in, cfg.words_v)
    br, warps1 = _row_tile(r, b1, cfg.rows_v, cfg.warps)
    n_rb = triton.cdiv(r, br)
    chunk, n_split = _split(W_in, b1, P * n_rb, int(cfg.waves * sms))
    vec_len = triton.cdiv(W_in, b1) * (16 if asm else 32) * b1
    # stage 2 tiles: lanes along r, then output rows; smaller blocks while the grid is under 2 waves
    # Covering a row in one step beat narrower, less wasteful steps in the sweep: more, shorter programs.
    b2 = cfg.words_u or min(32, _pow2_at_least(W_r))
    bo, warps2 = _row_tile(d_out, b2, cfg.rows_u, cfg.warps)
    while bo > 32 // b2 and triton.cdiv(d_out, bo) < 2 * sms:
        bo //= 2
        warps2 = max(1, warps2 // 2) if bo < cfg.rows_u * (32 // b2) * warps2 else warps2
    t_len = triton.cdiv(W_r, b2) * 32 * b2
    gx = torch.empty((M, P, vec_len), dtype=torch.int32 if asm else torch.float32, device=x2.device)
    t = torch.empty((M, P, t_len), dtype=torch.float32, device=x2.device)
    n_pw = triton.cdiv(W_in, 32)
    zb = _pow2_at_least(triton.cdiv(t.numel(), n_pw * M))
    _prep_kernel[(n_pw, M)](
        x2, g, gx, t, d_in, x2.stride(0), vec_len, t.numel(), P=P, BW=32, B1=b1, MODE=mode1, ZB=zb
    )
    _gemv_v_kernel[(P * n_rb, n_split)](
        gx, v, l, t, M, r, W_in, n_rb, chunk, vec_len, t_len,
        P=P, TOK=tok, BR=br, B1=b1, MODE1=mode1, B2=b2, MODE2=mode2, PTX=ptx, num_warps=warps1,
    )  # fmt: skip
    _gemv_u_kernel[(triton.cdiv(d_out, bo),)](
        t, u, h, y if bias is None else bias, y, M, d_out, W_r, y.stride(0), t_len,
        P=P, TOK=tok, BO=bo, B2=b2, MODE2=mode2, HAS_BIAS=bias is not None, PTX=ptx, num_warps=warps2,
    )  # fmt: skip


def _tensor_cores(x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    bm = min(64, max(16, _pow2_at_least(M)))
    n_mb = triton.cdiv(M, bm)
    Rp, Kp = 32 * W_r, 32 * W_in
    # The interpreter rounds to bf16 by truncation, a bias that piles up over a sum; it computes the
    # bf16 products in fp32 instead, which still checks everything but the rounding.
    op_dt = torch.float32 if _interpreting() and x2.dtype == torch.bfloat16 else x2.dtype
    xg = torch.empty((P, M, Kp), dtype=op_dt, device=x2.device)
    t = torch.empty((M, P, Rp), dtype=torch.float32, device=x2.device)
    bk = min(1024, _pow2_at_least(Kp))
    n_pk = triton.cdiv(Kp, bk)
    zb = _pow2_at_least(triton.cdiv(t.numel(), n_pk * M))
    _tc_prep_kernel[(n_pk, M)](x2, g, xg, t, M, d_in, Kp, x2.stride(0), t.numel(), P=P, BK=bk, ZB=zb)
    rows = cfg.tc_rows or (64 if r < 1024 else 128)
    words = cfg.tc_words or (2 if rows <= 64 else 4)
    target = int(cfg.tc_waves * sms)
    n_rb = triton.cdiv(r, rows)
    chunk, n_split = _split(W_in, words, P * n_rb * n_mb, target)
    _tc_v_kernel[(P * n_rb, n_split, n_mb)](
        xg, v, l, t, M, r, W_in, Rp, n_rb, chunk,
        P=P, BR=rows, BKW=words, BM=bm, OP_DT=_TL_DTYPES[op_dt], num_warps=cfg.tc_warps,
    )  # fmt: skip
    bo = rows
    while bo > 16 and triton.cdiv(d_out, bo) * n_mb < target:
        bo //= 2
    _tc_u_kernel[(triton.cdiv(d_out, bo), n_mb)](
        t, u, h, y if bias is None else bias, y, M, d_out, W_r, Rp, y.stride(0),
        P=P, BO=bo, BKW=words, BM=bm, HAS_BIAS=bias is not None, OP_DT=_TL_DTYPES[op_dt],
        num_warps=cfg.tc_warps,
    )  # fmt: skip


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
    d_in, d_out = g.shape[-1], h.shape[-1]
    x2 = x.reshape(-1, d_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], d_out), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        sms = 4 if _interpreting() or not x.is_cuda else _num_sms(x.device.index or 0)
        run = _gemv if x2.shape[0] <= cfg.gemv_max_tokens else _tensor_cores
        b = bias.contiguous() if bias is not None else None
        run(x2, u_signs.contiguous(), v_signs.contiguous(), h.contiguous(), l.contiguous(), g.contiguous(), b,
            y, cfg, sms)  # fmt: skip
    return y.reshape(*x.shape[:-1], d_out)


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
