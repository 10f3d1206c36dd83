"""What a run trains on: a data spec (one source, or a weighted mixture) made into packed sequences.

A spec is ``SOURCE[:WEIGHT],SOURCE[:WEIGHT],...``. ``SOURCE`` is ``generated`` (text the teacher
writes, see ``teacher_text``), a named split (``wikitext2:valid``), a text file or a folder of them,
or a Hugging Face dataset (``hf:NAME[?config=C&split=S&column=COL]``, streamed as far as the run reads);
a trailing ``:WEIGHT`` that reads as a number is the source's share of the training sequences (the
weights are normalised; 1 when left out). ``generated:0.7,notes.txt:0.3``.

A single text source trains on all of its sequences, as it always has. Otherwise the run's sequences
(as many as it reads, or ``TrainConfig.data_tokens`` worth) are split by weight: a text source is
cycled through when its share is larger than it is, generated text is written to order, and the
whole is shuffled with a fixed seed, so calibration and the block stage see the mixture too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from littlebit.config import LittleBitError
from littlebit.training.config import TrainConfig
from littlebit.training.data_spec import default_data_spec, mixture_counts, parse_data_spec
from littlebit.training.stream import load_tokens, pack_sequences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_MIX_SEED = 0x5EED


def generated_tokens_needed(spec: str | None, config: TrainConfig) -> int:
    """Generated tokens a run on ``spec`` reads (0 when it reads none)."""
    sources = parse_data_spec(_spec(spec or None, config))
    if not any(s.generated for s in sources):
        return 0
    counts = mixture_counts([s.weight for s in sources], _total_sequences(config))
    return sum(c for s, c in zip(sources, counts, strict=True) if s.generated) * config.seqlen


def _spec(data: str | Path | None, config: TrainConfig) -> str:
    """``data`` as a spec, or the default for the tokens this run reads."""
    return str(data) if data is not None else default_data_spec(config.sequences_read() * config.seqlen)


def _total_sequences(config: TrainConfig) -> int:
    if config.data_tokens is not None:
        return max(1, math.ceil(config.data_tokens / config.seqlen))
    return max(1, config.sequences_read())


def _cycled(sequences: torch.Tensor, count: int) -> torch.Tensor:
    return sequences[torch.arange(count) % sequences.shape[0]]


def training_sequences(
    data: torch.Tensor | str | Path | None,
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    teacher: nn.Module | None = None,
    cache_root: str | Path | None = None,
    on_shard: Callable[[int, int, float], None] | None = None,
) -> torch.Tensor:
    """The run's packed ``(n, seqlen)`` training sequences for ``data`` (token ids or a spec)."""
    if isinstance(data, torch.Tensor):
        return pack_sequences(load_tokens(data), config.seqlen)
    sources = parse_data_spec(_spec(data, config))
    seqlen = config.seqlen  # a hub source is read as far as its sequences need
    if len(sources) == 1 and not sources[0].generated:
        return pack_sequences(
            load_tokens(sources[0].source, tokenizer, _total_sequences(config) * seqlen), seqlen
        )
    counts = mixture_counts([s.weight for s in sources], _total_sequences(config))
    used = [(s, c) for s, c in zip(sources, counts, strict=True) if c > 0]
    # Text first: a missing file or dataset fails in seconds, not after minutes of generated text.
    texts = {s.source: load_tokens(s.source, tokenizer, c * seqlen) for s, c in used if not s.generated}
    parts = []
    for source, count in used:
        if source.generated:
            parts.append(_generated(count, config, tokenizer, teacher, cache_root, on_shard))
        else:
            parts.append(_cycled(pack_sequences(texts[source.source], config.seqlen), count))
    mixed = torch.cat(parts)
    order = torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(_MIX_SEED))
    return mixed[order]


def _generated(count, config, tokenizer, teacher, cache_root, on_shard) -> torch.Tensor:
    from littlebit.training.teacher_text import TextCache

    if tokenizer is None or teacher is None:
        raise LittleBitError("generated training text needs the teacher's tokenizer")
    cache = TextCache(teacher, tokenizer, config.generation, cache_root)
    tokens = count * config.seqlen
    cache.ensure(tokens, on_shard)
    return pack_sequences(cache.load(tokens), config.seqlen)[:count]
