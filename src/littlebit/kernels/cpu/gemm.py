"""Packed CPU path for many tokens (prompts, evaluation batches): the factors expanded per call, two GEMMs.

With many tokens the product is bound by its multiply-adds, which a BLAS GEMM does far better than any
table walk, so each call expands the packed signs into dense factors with the scales folded in and runs

    t = x @ A^T,   A = [l_p * S_V,p^T * g_p]_p    (P*r x d_in: both paths' latents side by side)
    y = t @ B^T + bias,   B = [h_p * S_U,p]_p      (d_out x P*r: one GEMM sums the paths)

The expansion writes each factor entry once, scales included, in the C library of ``kernels.cpu.lut``
(the sign as an xor from a per-byte table); without a C compiler it gathers +-1 through a 256 x 8
table (``embedding``) and multiplies the scales in place. Either way it costs a pass or a few over the
factors, small against the GEMMs once the token count passes the rank. Scales go
on the factors rather than on x or t because there are fewer factor entries than activations from
about r tokens on. Factors larger than ``_CHUNK`` entries are expanded a block of rows at a time, so
a call never holds a dense factor bigger than that (at 1.0 BPW the factors are as large as W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from littlebit.kernels.cpu.lut import MAX_TOKENS as LUT_MAX_TOKENS
from littlebit.kernels.cpu.lut import cpu_tokens, native_library

# Expand at most this many factor entries at once (64 MiB in fp32).
_CHUNK = 1 << 24

# Row c: bit b of byte c as +1 (set) or -1 (clear), bit 0 first, as ``packing`` orders entries.
_BYTE_SIGNS = torch.tensor([[1.0 if (c >> b) & 1 else -1.0 for b in range(8)] for c in range(256)])
_tables: dict[torch.dtype, torch.Tensor] = {torch.float32: _BYTE_SIGNS}


def _table(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _tables:
        _tables[dtype] = _BYTE_SIGNS.to(dtype)
    return _tables[dtype]


def expand_signs(words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 words ``(..., W)`` -> +-1 ``(..., n)`` of ``dtype``, one table row per byte (little-endian
    hosts: byte k of a word holds entries 8k .. 8k+7)."""
    lead, W = words.shape[:-1], words.shape[-1]
    idx = words.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
    signs = F.embedding(idx, _table(dtype)).view(*lead, 32 * W)
    return signs if n == 32 * W else signs[..., :n]


def _scaled_into(out: torch.Tensor, words: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor | None) -> None:
    """out (rows, n), fp32, unit column stride = rs[:, None] * cs[None, :] * (+-1 of ``words``); cs None:
    ones. One pass in the native library when there is one, else a table gather and in-place products."""
    rows, n = out.shape
    lib = native_library()
    if lib is not None:
        # held in locals: a pointer into a temporary copy would dangle by the time of the call
        words, rs = words.contiguous(), rs.contiguous()
        cs = None if cs is None else cs.contiguous()
        lib.littlebit_expand(
            words.data_ptr(), rows, words.shape[-1], n, rs.data_ptr(),
            None if cs is None else cs.data_ptr(), out.data_ptr(), out.stride(0),
        )  # fmt: skip
        return
    signs = expand_signs(words, n, torch.float32)
    if cs is not None:
        signs.mul_(cs)
    torch.mul(signs, rs[:, None], out=out)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 GEMMs where the activations are bf16 (on a Xeon with AMX 7.6x faster than fp32: 768x576x384,
    one thread, 0.22 against 1.65 ms); fp32 otherwise (fp16 GEMMs were no faster than fp32 there, 1.64
    ms, and fp32 keeps the precision)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _stage1(
    x2: torch.Tensor, v: torch.Tensor, l: torch.Tensor, g: torch.Tensor, cd: torch.dtype
) -> torch.Tensor:
    """t = x @ A^T, (M, P*r), path p's latents at columns p*r .. p*r + r - 1."""
    P, r, _ = v.shape
    d_in = g.shape[-1]
    lf, gf = l.to(torch.float32), g.to(torch.float32)
    step = max(1, _CHUNK // max(d_in, 1))
    if P * r * d_in <= _CHUNK:  # the common case: one expansion, one GEMM for all paths
        a = torch.empty(P * r, d_in)
        for p in range(P):
            _scaled_into(a[p * r : (p + 1) * r], v[p], lf[p], gf[p])
        return x2 @ a.to(cd).T
    t = x2.new_empty(x2.shape[0], P * r)
    for p in range(P):
        for i in range(0, r, step):
            j = min(r, i + step)
            a = torch.empty(j - i, d_in)
            _scaled_into(a, v[p, i:j], lf[p, i:j], gf[p])
            t[:, p * r + i : p * r + j] = x2 @ a.to(cd).T
    return t


def _stage2(t: torch.Tensor, u: torch.Tensor, h: torch.Tensor, bias, cd: torch.dtype) -> torch.Tensor:
    """y = t @ B^T + bias, (M, d_out); B's rows expanded a block at a time."""
    P, d_out, _ = u.shape
    r = t.shape[1] // P
    hf = h.to(torch.float32)
    step = max(1, _CHUNK // max(P * r, 1))
    blocks = []
    for i in range(0, d_out, step):
        j = min(d_out, i + step)
        b = torch.empty(j - i, P * r)  # a row of B: both paths' factors of one output, side by side
        for p in range(P):
            _scaled_into(b[:, p * r : (p + 1) * r], u[p, i:j], hf[p, i:j], None)
        if bias is None:
            blocks.append(t @ b.to(cd).T)
        else:
            blocks.append(torch.addmm(bias[i:j].to(cd), t, b.to(cd).T))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def littlebit_linear_cpu_gemm(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The packed product on the CPU for many tokens; GEMMs in fp32 (bf16 for bf16 inputs), the result
    in ``x.dtype``."""
    d_in, d_out = g.shape[-1], h.shape[-1]
    cd = _compute_dtype(x.dtype)
    x2 = x.reshape(-1, d_in)
    if x2.dtype != cd or not x2.is_contiguous():
        x2 = x2.to(cd).contiguous()
    t = _stage1(x2, v_signs, l, g, cd)
    y = _stage2(t, u_signs, h, bias, cd)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], d_out)


def accepts(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> bool:
    """A CPU call of more tokens than the table path takes (``lut.cpu_tokens``)."""
    tokens = cpu_tokens(x, u_signs, v_signs)
    return tokens is not None and tokens > LUT_MAX_TOKENS
