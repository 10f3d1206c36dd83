"""Batched sampling with a static cache (``training.batch_decoding``) against transformers' ``generate``
with the same sampler: the same tokens from the same seed, left padding and end tokens included."""

from __future__ import annotations

import pytest
import torch

from littlebit.config import LittleBitError
from littlebit.training import batch_decoding
from littlebit.training.batch_decoding import _grouped_sdpa, sample_batch
from littlebit.training.sampling import NucleusSampler


def _model(tiny_dir, attention: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attention).eval()


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 6, 3 and 1 tokens, left-padded with token 0."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate((6, 3, 1)):
        ids[row, : 6 - length], mask[row, : 6 - length] = 0, 0
    return ids, mask


def _generate(model, ids, mask, length, eos) -> torch.Tensor:
    from transformers import GenerationConfig, LogitsProcessorList

    cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=length - ids.shape[1],
        eos_token_id=eos,
        pad_token_id=0,
        cache_implementation="static",
    )
    processors = LogitsProcessorList([NucleusSampler(0.8, 0.9)])
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, generation_config=cfg, logits_processor=processors)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sampling_draws_what_generate_draws(tiny_dir, attention):
    model = _model(tiny_dir, attention)
    ids, mask = _prompts(model.config.vocab_size)
    torch.manual_seed(7)
    ours = sample_batch(model, ids, mask, 40, 0.8, 0.9, eos=None, graphs=False)
    torch.manual_seed(7)
    ref = _generate(model, ids, mask, 40, eos=None)
    assert ours.shape == ref.shape == (3, 40)
    assert torch.equal(ours, ref)


def test_rows_agree_up_to_their_end_token_and_sampling_stops_when_all_ended(tiny_dir, monkeypatch):
    """With an end token that comes often, each row matches ``generate`` up to its first one (after it
    ``generate`` pads, sampling goes on), and sampling stops within 16 steps of the last row's."""
    model = _model(tiny_dir, "sdpa")
    eos, forward = 5, model.forward

    def ends_often(*args, **kwargs):  # the end token in about 4 % of draws
        out = forward(*args, **kwargs)
        out.logits[..., eos] += 6.0
        return out

    monkeypatch.setattr(model, "forward", ends_often)
    ids, mask = _prompts(model.config.vocab_size)
    torch.manual_seed(3)
    ours = sample_batch(model, ids, mask, 400, 0.8, 0.9, eos=eos, graphs=False)
    torch.manual_seed(3)
    ref = _generate(model, ids, mask, 400, eos=eos)
    ends = []
    for row in range(3):
        at = 6 + int((ours[row, 6:] == eos).nonzero()[0])
        assert torch.equal(ours[row, : at + 1], ref[row, : at + 1])
        ends.append(at)
    assert max(ends) < ours.shape[1] <= max(ends) + 17 < 400


def test_other_attention_is_refused_in_one_line(tiny_dir):
    model = _model(tiny_dir, "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    ids, mask = _prompts(model.config.vocab_size)
    with pytest.raises(LittleBitError, match="sdpa or eager"):
        sample_batch(model, ids, mask, 10, 1.0, 1.0, eos=None, graphs=False)


@pytest.mark.parametrize("queries", [1, 5])
def test_grouped_attention_matches_attention_on_the_copied_cache(queries):
    """Fresh random queries, cache and mask: one query a row runs each key/value head's group of
    query heads against the cache itself; more than one goes to transformers' sdpa. Both give what
    attention over keys and values copied once per query head gives."""
    rows, heads, kv_heads, slots, dim = 3, 6, 2, 11, 8
    query = torch.randn(rows, heads, queries, dim, dtype=torch.float64)
    key, value = (torch.randn(rows, kv_heads, slots, dim, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(rows, 1, queries, slots) < 0.7
    mask[..., 0] = True  # every query attends to something
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    out, _ = _grouped_sdpa(module, query, key, value, mask, scaling=0.3)
    groups = heads // kv_heads
    copied = [t.repeat_interleave(groups, dim=1) for t in (key, value)]
    ref = torch.nn.functional.scaled_dot_product_attention(query, *copied, attn_mask=mask, scale=0.3)
    assert out.shape == (rows, queries, heads, dim)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_the_model_keeps_its_attention_after_sampling_and_after_a_failure(tiny_dir, monkeypatch):
    model = _model(tiny_dir, "sdpa")
    ids, mask = _prompts(model.config.vocab_size)
    sample_batch(model, ids, mask, 10, 1.0, 1.0, eos=None, graphs=False)
    assert model.config._attn_implementation == "sdpa"

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample_batch(model, ids, mask, 10, 1.0, 1.0, eos=None, graphs=False)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_steps_draw_what_eager_steps_draw(tiny_dir, watch_recorded_steps):
    """Nearly greedy (temperature 1e-4), so the draws do not depend on how the generator's stream is
    split between recorded replays: the recorded decoding gives the eager one's tokens, and the steps
    were replayed from a recording (not the eager fallback)."""
    steps = watch_recorded_steps(batch_decoding)
    model = _model(tiny_dir, "sdpa").cuda()
    ids, mask = (t.cuda() for t in _prompts(model.config.vocab_size))
    eager = sample_batch(model, ids, mask, 64, 1e-4, 1.0, eos=None, graphs=False)
    recorded = sample_batch(model, ids, mask, 64, 1e-4, 1.0, eos=None, graphs=True)
    assert len(steps) == 1 and steps[0].active
    assert torch.equal(eager, recorded)
