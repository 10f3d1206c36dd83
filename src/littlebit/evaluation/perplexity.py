"""Perplexity as GPTQ and the paper measure it (LITTLEBIT.md section 5)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from littlebit.config import LittleBitError
from littlebit.evaluation.data import eval_text, test_set_text
from littlebit.evaluation.hub import is_hub_source
from littlebit.runtime.step_graph import GraphedMicroStep

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_eval(
    tokenizer: PreTrainedTokenizerBase, name: str, split: str = "test", data_dir: str | Path | None = None
) -> torch.Tensor:
    """The whole split as one token sequence, shape ``(1, n)``."""
    return tokenizer(eval_text(name, split, data_dir), return_tensors="pt").input_ids


def _window_nll(model: nn.Module):
    """``step(window) -> {"nll": summed next-token NLL of the window}``."""

    def step(window: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(window, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
        )
        return {"nll": nll}

    return step


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
    recorded: bool = True,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seqlen`` tokens, tail dropped.

    On a GPU, with ``recorded``, the windows after the first two replay one window's forward recorded
    as a CUDA graph (``runtime.step_graph``), so the host does not issue every kernel of every window,
    which is what bounds an eager forward of packed layers. Not in a sharded (multi-process) run,
    whose collectives cannot be replayed. A model that cannot be recorded stays eager, with a warning;
    forward hooks fire for the eager windows and the recording, not for replays. The NLLs add up on
    the device, in float64."""
    n_windows = input_ids.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has fewer than {seqlen} tokens")
    device = next(model.parameters()).device
    step = _window_nll(model)
    sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
    if recorded and device.type == "cuda" and not sharded:
        step = GraphedMicroStep(step, what="perplexity window")
    ids = input_ids[:, : n_windows * seqlen].to(device)  # one copy: no wait for the GPU per window
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in tqdm(range(n_windows), desc=desc, disable=not progress):
        total += step(ids[:, i * seqlen : (i + 1) * seqlen])["nll"]
    return math.exp(total.item() / (n_windows * (seqlen - 1)))


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    texts: dict[str, tuple[str, str | None]] | None = None,
) -> dict[str, dict]:
    """Per test set (``data.test_set_text``: a named dataset, a text file or folder, a Hugging Face
    dataset): ``{"perplexity", "windows", "windows_in_split", "seqlen", "split"}``. From the hub only
    what ``max_windows`` windows need is read, so there "windows_in_split" is None: the split's size
    is not known. ``texts``: ``read_test_sets``'s result, when the caller read them before loading the
    model."""
    texts = texts if texts is not None else read_test_sets(datasets, seqlen, max_windows, data_dir)
    results = {}
    for name in datasets:
        text, split = texts[name]
        ids = tokenizer(text, return_tensors="pt").input_ids
        available = ids.shape[1] // seqlen
        if available == 0:
            raise LittleBitError(f"{name} has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
        used = available if max_windows is None else min(available, max_windows)
        ppl = perplexity(model, ids, seqlen, max_windows, progress, desc=f"{name} ppl")
        results[name] = {
            "perplexity": ppl,
            "windows": used,
            "windows_in_split": None if is_hub_source(name) and max_windows is not None else available,
            "seqlen": seqlen,
            "split": split,
        }
    return results


def read_test_sets(
    datasets: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, tuple[str, str | None]]:
    """Each test set's text and split (``data.test_set_text``), from the hub only as much as
    ``max_windows`` windows of ``seqlen`` tokens need."""
    max_tokens = None if max_windows is None else max_windows * seqlen
    return {name: test_set_text(name, data_dir, max_tokens) for name in datasets}
