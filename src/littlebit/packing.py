"""Sign matrices stored one bit per entry in 32-bit words.

Layout (shared with the GPU kernels): signs are packed along the *last* axis, which is always the
reduction axis of the product that reads them. Word ``k`` of a row holds entries ``32k .. 32k+31``;
entry ``32k + b`` is bit ``b`` counted from the least significant bit. A set bit means +1, a clear
bit -1; sign(0) is +1. Padding bits past the row's length are clear. Words are stored as int32
(safetensors and every framework have it), read as raw 32-bit patterns.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int64)


def n_words(n: int) -> int:
    return (n + WORD_BITS - 1) // WORD_BITS


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` along the last axis: shape ``(..., n)`` -> int32 ``(..., ceil(n / 32))``."""
    n = x.shape[-1]
    bits = (x >= 0).to(torch.int64)
    pad = n_words(n) * WORD_BITS - n
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*x.shape[:-1], n_words(n), WORD_BITS)
    words = (bits << _SHIFTS.to(x.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """The bits as a bool tensor ``(..., n)``."""
    shifts = _SHIFTS.to(device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)[..., :n].bool()


def unpack_signs(words: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: int32 ``(..., w)`` -> +-1 of ``dtype`` with shape ``(..., n)``."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed signs must be int32, got {words.dtype}")
    if n > words.shape[-1] * WORD_BITS or n <= (words.shape[-1] - 1) * WORD_BITS:
        raise ValueError(f"{words.shape[-1]} words cannot hold exactly {n} entries")
    bits = unpack_bits(words, n)
    one = torch.ones((), dtype=dtype, device=words.device)
    return torch.where(bits, one, -one)
