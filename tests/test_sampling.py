"""Nucleus sampling for the teacher's text: both ways of finding the nucleus against a float64 sort,
and the draws against the renormalised nucleus."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from littlebit.training.sampling import NucleusSampler, nucleus_floor, sample_nucleus


def _check_nucleus(probs: torch.Tensor, floor: torch.Tensor, top_p: float) -> None:
    """The kept tokens are the most probable ones, reach ``top_p`` and would not without the last
    (to float32 summation rounding)."""
    p64 = probs.double()
    for row, f in zip(p64, floor.double(), strict=True):
        kept = row[row >= f]
        assert kept.numel() >= 1
        dropped = row[row < f]
        assert dropped.numel() == 0 or dropped.max() <= kept.min()
        assert kept.sum() >= top_p - 1e-5
        assert kept.sum() - kept.min() < top_p + 1e-5


@pytest.mark.parametrize("method", ["sort", "buckets"])
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 20.0),
    top_p=st.floats(0.05, 0.99),
    vocab=st.integers(2, 3000),
)
def test_nucleus_floor_matches_float64_sort(method, seed, scale, top_p, vocab):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(5, vocab, generator=gen) * scale, dim=-1)
    _check_nucleus(probs, nucleus_floor(probs, top_p, method), top_p)


def test_bucket_and_sort_nuclei_agree_on_a_vocabulary_sized_batch():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, 49152, generator=gen) * 3, dim=-1)
    a, b = nucleus_floor(probs, 0.95, "sort"), nucleus_floor(probs, 0.95, "buckets")
    counts = [(probs >= f[:, None]).sum(-1) for f in (a, b)]
    assert (counts[0] - counts[1]).abs().max() <= 1  # a boundary tie under summation order at most
    _check_nucleus(probs, b, 0.95)


def test_nucleus_reaching_the_lowest_bucket_falls_back_to_the_sort():
    probs = torch.full((2, 4096), 1 / 4096)
    probs[1, :8] = 0.1
    probs[1] /= probs[1].sum()
    floor = nucleus_floor(probs, 0.9999, "buckets")
    _check_nucleus(probs, floor, 0.9999)


def test_one_hot_rows_keep_their_token():
    probs = torch.zeros(3, 100)
    probs[torch.arange(3), torch.tensor([5, 0, 99])] = 1.0
    assert torch.equal(nucleus_floor(probs, 0.9, "buckets"), torch.ones(3))
    logits = torch.where(probs > 0, 0.0, -1e4)
    assert sample_nucleus(logits, 1.0, 0.9).tolist() == [5, 0, 99]


def test_draws_follow_the_renormalised_nucleus():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().expand(40000, -1).clone()
    torch.manual_seed(0)
    draws = sample_nucleus(logits, 1.0, 0.7)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    want = torch.tensor([0.4, 0.25, 0.15, 0, 0, 0], dtype=torch.float64) / 0.8
    assert torch.allclose(freq, want, atol=0.01)
    torch.manual_seed(0)
    assert torch.equal(sample_nucleus(logits, 1.0, 0.7), draws)  # the default generator's stream


def test_top_p_one_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(30000, -1).clone()
    torch.manual_seed(1)
    freq = torch.bincount(sample_nucleus(logits, 2.0, 1.0), minlength=3).double() / 30000
    want = torch.softmax(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0)
    assert torch.allclose(freq, want, atol=0.01)


def test_processor_leaves_only_the_drawn_token():
    torch.manual_seed(2)
    scores = torch.randn(4, 50)
    out = NucleusSampler(1.0, 0.9)(torch.zeros(4, 1, dtype=torch.long), scores)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1, 1, 1]
    torch.manual_seed(2)
    torch.randn(4, 50)
    assert torch.equal(out.argmax(-1), sample_nucleus(scores, 1.0, 0.9))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown nucleus method"):
        nucleus_floor(torch.full((1, 4), 0.25), 0.5, "heap")
