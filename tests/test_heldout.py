"""The held-out headline: ratios to the FP model, higher is worse, and their geometric mean."""

from __future__ import annotations

import math

import pytest

from littlebit.evaluation.heldout import headline, ratios

FP = {"wikitext2_ppl": 20.0, "ptb_ppl": 40.0, "piqa_acc": 0.64}


def test_ratios_are_higher_when_worse_for_perplexity_and_accuracy_alike():
    r = ratios({"wikitext2_ppl": 40.0, "ptb_ppl": 40.0, "piqa_acc": 0.32}, FP)
    assert r == pytest.approx({"wikitext2": 2.0, "ptb": 1.0, "piqa": 2.0})
    assert headline(r) == pytest.approx(4 ** (1 / 3))
    assert headline(ratios(FP, FP)) == pytest.approx(1.0)


def test_missing_parts_are_left_out_and_broken_scores_give_nan():
    assert ratios({"wikitext2_ppl": 30.0}, FP) == pytest.approx({"wikitext2": 1.5})
    assert headline({"wikitext2": 1.5}) == pytest.approx(1.5)
    assert math.isnan(headline({}))
    assert math.isnan(headline({"wikitext2": float("inf"), "ptb": 1.0}))
    assert "piqa" not in ratios({"piqa_acc": 0.0}, FP)
