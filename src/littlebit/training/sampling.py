"""Nucleus (top-p) sampling for the teacher's text: ``sample_nucleus``, which ``batch_decoding`` draws
with, and ``NucleusSampler``, the same as a logits processor for transformers' greedy search.

transformers' own sampler sorts the whole vocabulary at every step and draws with
``torch.multinomial``; on a CPU those two took over half of a decoding step of the default model
(batch 32: sort 86 ms and the multinomial's exponential draws 47 ms of 284 ms). Here the nucleus
(the most probable tokens whose mass first reaches ``top_p``) is found without a sort on the CPU, from
a histogram of the probabilities' float32 bit patterns (which order as integers for positive floats),
and the token is drawn by inverse CDF from one uniform number per sequence. On a GPU the sort is cheap
and a few launches instead of about twenty, so it finds the same nucleus there. ``NucleusSampler`` returns
scores that are -inf except at the drawn token, so transformers' greedy search (``do_sample=False``)
takes exactly that token.
"""

from __future__ import annotations

import torch

# Probabilities below 2**-24 share one bucket: together at most 2**-24 per vocabulary entry (0.003 for
# 49,152 entries), so the nucleus reaches into it only for top_p within that of 1 (then: the sort).
_FLOOR_EXPONENT = 127 - 24
_MANTISSA_BITS = 7  # buckets of 1/128 of a power of two
_LOW_BITS = 23 - _MANTISSA_BITS  # the float32 mantissa bits below a bucket's


def nucleus_floor(probs: torch.Tensor, top_p: float, method: str | None = None) -> torch.Tensor:
    """Per row of ``probs`` (B, V; float32, rows summing to 1), the smallest probability in the
    nucleus: the row's tokens with probability at least this are the fewest most probable ones whose
    mass reaches ``top_p``.

    ``method``: ``"sort"`` (the whole row sorted) or ``"buckets"`` (the default off the GPU: the
    probabilities' float32 bit patterns, which order as integers, bucketed by exponent and 7 mantissa
    bits; the bucket where the mass from the top reaches ``top_p`` then bisected within).
    """
    method = method or ("sort" if probs.is_cuda else "buckets")
    if method == "buckets":
        floor = _floor_by_buckets(probs, top_p)
        if floor is not None:
            return floor
    elif method != "sort":
        raise ValueError(f"unknown nucleus method {method!r}")
    vals = probs.sort(dim=-1, descending=True).values
    before = vals.cumsum(-1) - vals  # mass of the tokens ranked above each one
    n = (before < top_p).sum(-1, keepdim=True).clamp_min(1)
    return vals.gather(-1, n - 1).squeeze(-1)


def _floor_by_buckets(probs: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """``nucleus_floor`` in a few passes over ``probs``; None where the nucleus reaches the lowest
    bucket."""
    rows_n = probs.shape[0]
    bits = probs.contiguous().view(torch.int32)
    base = _FLOOR_EXPONENT << _MANTISSA_BITS
    n_buckets = (127 << _MANTISSA_BITS) - base + 1  # up to the bucket of 1.0
    key = ((bits >> _LOW_BITS) - base).clamp_(0, n_buckets - 1)
    row = torch.arange(rows_n, device=probs.device)
    mass = probs.new_zeros(rows_n * n_buckets)
    mass.index_add_(0, (key + (row * n_buckets)[:, None]).flatten(), probs.flatten())
    mass = mass.view(rows_n, n_buckets)
    from_top = mass.flip(-1).cumsum(-1).flip(-1)  # mass of each bucket and all above it
    edge = ((from_top >= top_p).sum(-1) - 1).clamp_min(0)  # the lowest bucket still needed
    if bool((edge == 0).any()):
        return None
    above = from_top.gather(-1, edge[:, None]).squeeze(-1) - mass.gather(-1, edge[:, None]).squeeze(-1)
    # Bisect the bit patterns of the edge bucket's entries: lo keeps enough mass, hi does not.
    r, c = (key == edge[:, None]).nonzero(as_tuple=True)
    vals, vbits = probs[r, c], bits[r, c].to(torch.int64)
    lo = (edge + base).to(torch.int64) << _LOW_BITS
    hi = (edge + base + 1).to(torch.int64) << _LOW_BITS
    for _ in range(_LOW_BITS):
        mid = (lo + hi) // 2
        kept = torch.where(vbits >= mid[r], vals, vals.new_zeros(()))
        reach = above.index_add(0, r, kept) >= top_p
        lo, hi = torch.where(reach, mid, lo), torch.where(reach, hi, mid)
    return lo.to(torch.int32).view(torch.float32)


def sample_nucleus(
    logits: torch.Tensor, temperature: float, top_p: float, method: str | None = None
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) from softmax(logits / temperature) restricted to its
    nucleus, drawn with the default generator of ``logits``' device."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        floor = nucleus_floor(probs, top_p, method)
        probs = torch.where(probs >= floor[:, None], probs, probs.new_zeros(()))
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(-1)


class NucleusSampler:
    """A transformers logits processor that samples: scores are -inf except at the drawn token."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = sample_nucleus(scores, self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token[:, None], 0.0)
