"""Training tokens: text or token tensors packed into fixed-length sequences, in a seeded order.

The order is a pure function of ``(seed, sample index)``: sample ``k`` is sequence
``perm(seed, epoch)[k % n]`` with ``epoch = k // n``. The whole data position of a run is therefore
one integer, which is what makes resuming exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from littlebit.config import LittleBitError
from littlebit.evaluation.data import training_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokenize long text in pieces: fast tokenizers are quadratic-free but hold the whole encoding in
# memory, and a few MB of text at once is where they stay quick.
_CHUNK_CHARS = 1 << 20


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The text as one 1-D int64 token stream, cut at line breaks so no word is split."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        ids = tokenizer(text[start:end], add_special_tokens=False, return_tensors="pt").input_ids
        pieces.append(ids.reshape(-1))
        start = end
    if not pieces:
        raise LittleBitError("the training text is empty")
    return torch.cat(pieces).to(torch.int64)


def load_tokens(
    source: str | Path | torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """A token stream from a tensor of ids, or from a text source (see ``data.training_text``;
    a Hugging Face dataset is read as far as ``max_tokens`` need)."""
    if isinstance(source, torch.Tensor):
        if source.dtype.is_floating_point:
            raise LittleBitError(f"token ids must be integers, got {source.dtype}")
        return source.reshape(-1).to(torch.int64)
    if tokenizer is None:
        raise LittleBitError("a tokenizer is needed to train on text; pass token ids instead")
    return tokenize_text(training_text(source, max_tokens=max_tokens), tokenizer)


def pack_sequences(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Consecutive non-overlapping ``(n, seqlen)`` sequences; the tail that does not fill one is dropped."""
    if seqlen < 2:
        raise LittleBitError(f"sequence length must be at least 2, got {seqlen}")
    tokens = tokens.reshape(-1)
    n = tokens.numel() // seqlen
    if n == 0:
        raise LittleBitError(f"{tokens.numel()} training tokens do not fill one sequence of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)


class SequenceOrder:
    """Which sequence is the ``k``-th sample: a fresh seeded permutation every epoch."""

    def __init__(self, n_sequences: int, seed: int = 0) -> None:
        if n_sequences < 1:
            raise LittleBitError("no training sequences")
        self.n, self.seed = n_sequences, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # a generator takes at most 2^64 - 1: any seed LittleBitConfig allows stays in range
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._permutation(k // self.n)[k % self.n]) for k in range(start, start + count)]


class Batches:
    """Batches of packed sequences; ``position`` (samples drawn so far) is the resumable state."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int = 0, position: int = 0) -> None:
        if batch_size < 1:
            raise LittleBitError(f"batch size must be >= 1, got {batch_size}")
        self.sequences, self.batch_size = sequences, batch_size
        self.order = SequenceOrder(sequences.shape[0], seed)
        self.position = position

    def next(self) -> torch.Tensor:
        idx = self.order.indices(self.position, self.batch_size)
        self.position += self.batch_size
        return self.sequences[idx]
