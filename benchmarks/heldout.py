"""Held-out quality of a language model, as the training benchmark judges a recipe.

WikiText-2 and PTB test perplexity (whole splits, windows of 2048) and PIQA accuracy (lm-eval's
zero-shot task, whole validation split), each as a ratio to the FP model's: perplexity / FP
perplexity, and FP accuracy / accuracy, so every ratio is 1.0 for the FP model and grows as quality
is lost. The headline is their geometric mean: one number that improves only when the held-out
quality does, not when one test set wins at the others' expense.
"""

from __future__ import annotations

import math
import time

import torch

from littlebit.evaluation.perplexity import perplexity, tokenize_eval
from littlebit.evaluation.tasks import evaluate_tasks

TEXTS = ("wikitext2", "ptb")
TASKS = ("piqa",)


def test_ids(tokenizer, texts: tuple[str, ...] = TEXTS) -> dict[str, torch.Tensor]:
    return {name: tokenize_eval(tokenizer, name, "test") for name in texts}


def evaluate(
    model,
    tokenizer,
    ids: dict[str, torch.Tensor],
    tasks: tuple[str, ...] = TASKS,
    max_windows: int | None = None,
    task_limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """``{wikitext2: ppl, ptb: ppl, piqa_acc: acc, piqa_acc_norm: acc, heldout_s: seconds}``; on the GPU
    under bf16 autocast, as the training evaluates."""
    device = next(model.parameters()).device.type
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for name, x in ids.items():
            out[name] = perplexity(model, x, 2048, max_windows, progress=False)
        if tasks:
            scores = evaluate_tasks(model, tokenizer, list(tasks), limit=task_limit, batch_size=batch_size)
            for task, metrics in scores.items():
                out[f"{task}_acc"] = metrics["acc"]
                out[f"{task}_acc_norm"] = metrics.get("acc_norm")
                out[f"{task}_samples"] = metrics.get("samples")
    out["heldout_s"] = round(time.perf_counter() - t0, 1)
    return out


def ratios(scores: dict[str, float], fp: dict[str, float]) -> dict[str, float]:
    """Each metric's ratio to FP (larger = worse) and ``headline``, their geometric mean."""
    r = {f"{name}_ratio": scores[name] / fp[name] for name in TEXTS if name in scores and name in fp}
    for task in TASKS:
        key = f"{task}_acc"
        if key in scores and key in fp and scores[key]:
            r[f"{task}_ratio"] = fp[key] / scores[key]
    values = list(r.values())
    r["headline"] = math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
    return {k: round(v, 4) for k, v in r.items()}
