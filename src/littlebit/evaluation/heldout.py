"""Held-out quality of a recipe: WikiText-2 test, PTB test and PIQA, against the full-precision model.

Every score becomes a ratio to the FP model's in which higher is worse: perplexity / FP perplexity
for WikiText-2 and PTB, and FP accuracy / accuracy for PIQA (so a student at the FP accuracy scores 1
and one at half of it scores 2, like a doubled perplexity). The headline is the geometric mean of
the ratios: one number per run, lower is better, 1.0 is the FP model.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from littlebit.evaluation.perplexity import perplexity, tokenize_eval

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PARTS = ("wikitext2", "ptb", "piqa")
RATIO_CONVENTION = (
    "ratio to FP, higher is worse: ppl / FP ppl for wikitext2 and ptb, FP acc / acc for piqa; "
    "headline = geometric mean of the ratios"
)


def _amp(model: nn.Module):
    device = next(model.parameters()).device
    if device.type != "cuda":
        return contextlib.nullcontext()
    # No cast cache: tensors it keeps across a CUDA-graph recording (``perplexity``) would outlive it.
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def held_out_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    parts: tuple[str, ...] = PARTS,
    seqlen: int = 2048,
    max_windows: int | None = None,
    piqa_limit: int | None = None,
    batch_size: int = 32,
    data_dir: str | Path | None = None,
    eval_ids: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``wikitext2_ppl``, ``ptb_ppl`` (whole test splits at ``seqlen`` unless ``max_windows``),
    ``piqa_acc`` and ``piqa_acc_norm`` (all 1,838 validation questions unless ``piqa_limit``), for
    the parts asked. ``eval_ids`` holds already tokenized splits, to tokenize them once per process."""
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for name in (p for p in parts if p != "piqa"):
            ids = (eval_ids or {}).get(name)
            if ids is None:
                ids = tokenize_eval(tokenizer, name, "test", data_dir)
            with _amp(model):
                out[f"{name}_ppl"] = perplexity(model, ids, seqlen, max_windows, progress=False)
        if "piqa" in parts:
            from littlebit.evaluation.tasks import evaluate_tasks

            with _amp(model):
                piqa = evaluate_tasks(model, tokenizer, ["piqa"], piqa_limit, None, batch_size, data_dir)[
                    "piqa"
                ]
            out["piqa_acc"], out["piqa_acc_norm"] = piqa["acc"], piqa.get("acc_norm")
            out["piqa_samples"] = piqa.get("samples")
    finally:
        model.train(was_training)
    return out


def ratios(scores: dict[str, float], fp: dict[str, float]) -> dict[str, float]:
    """Each part's ratio to FP, higher is worse (see the module's docstring)."""
    out = {}
    for name in ("wikitext2", "ptb"):
        key = f"{name}_ppl"
        if key in scores and key in fp:
            out[name] = scores[key] / fp[key]
    if scores.get("piqa_acc") and fp.get("piqa_acc"):
        out["piqa"] = fp["piqa_acc"] / scores["piqa_acc"]
    return out


def headline(part_ratios: dict[str, float]) -> float:
    """The geometric mean of the ratios (NaN when there are none or one is not finite)."""
    values = list(part_ratios.values())
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))
