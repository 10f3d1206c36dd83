"""Perplexity over windows: the NLL arithmetic, and on a GPU the windows replayed from a recorded CUDA
graph (FP and packed layers, on each many-token kernel family) against the eager forward."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import tiny_model

import littlebit.evaluation.perplexity as perplexity_module
from littlebit.evaluation.perplexity import perplexity


def _direct(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """The definition, one window at a time: exp(sum of next-token NLLs / predicted tokens)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            w = ids[:, i * seqlen : (i + 1) * seqlen]
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, w[0, 1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(nll / count)


def test_perplexity_is_the_mean_next_token_nll_over_whole_windows():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, 5 * 16 + 7), generator=gen)
    for windows, used in ((None, 5), (2, 2)):  # the tail of 7 tokens is dropped
        expected = _direct(model, ids, 16, used)
        assert perplexity(model, ids, 16, windows, progress=False) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than 200 tokens"):
        perplexity(model, ids, 200, progress=False)


def _compressed(model, packed: bool):
    from littlebit import LittleBitConfig, pack_model
    from littlebit.core.convert import convert

    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    return pack_model(model) if packed else model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    "seqlen, family", [(32, "tensor-core"), (96, "prefill"), (256, "gemm")]
)  # the many-token paths of packed layers (one window: seqlen tokens a call)
@pytest.mark.parametrize("form", ["fp", "packed", "training-autocast"])
def test_recorded_windows_match_eager_windows(form, seqlen, family, watch_recorded_steps):
    from littlebit.evaluation.heldout import _amp
    from littlebit.kernels.gpu.config import DEFAULT_CONFIG
    from littlebit.kernels.gpu.route import kernel_family

    assert kernel_family(seqlen, DEFAULT_CONFIG) == family
    made = watch_recorded_steps(perplexity_module)
    model = tiny_model("llama")
    if form != "fp":
        model = _compressed(model, packed=form == "packed")
    # held-out scoring's form: the fp32 training-form student under bf16 autocast (``heldout._amp``)
    autocast = form == "training-autocast"
    model = model.cuda() if autocast else model.to(device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seqlen)
    ids = torch.randint(0, model.config.vocab_size, (1, 6 * seqlen), generator=gen)
    with _amp(model) if autocast else contextlib.nullcontext():
        eager = perplexity(model, ids, seqlen, progress=False, recorded=False)
        assert not made
        recorded = perplexity(model, ids, seqlen, progress=False)
    assert len(made) == 1 and made[0].active  # windows 3 to 6 were replayed from the recording
    assert recorded == pytest.approx(eager, rel=1e-4)
