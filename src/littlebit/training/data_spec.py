"""Data specs without torch: what ``--data`` names, checked before anything heavy loads.

``SOURCE[:WEIGHT],SOURCE[:WEIGHT],...``, where ``SOURCE`` is ``generated``, a named split
(``wikitext2:valid``), a text file or a folder of them, or a Hugging Face dataset
(``hf:NAME[?config=C&split=S&column=COL]``; ``training.data`` reads them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from littlebit.config import LittleBitError
from littlebit.evaluation.data import check_training_source, default_data_dirs

GENERATED = "generated"
# With a local WikiText-2 validation split: the split alone for budgets it holds without repeating, and
# 70 % the teacher's own text beyond that. Measured on the default model (held-out WikiText-2 / PTB,
# docs/recipe.md): at 40,960 tokens the split alone scored better than either mixture tried
# (CPU: 352 / 1044 against 451 / 1019 with 70 % generated); at 1.6M tokens, where the split (268k
# tokens) is read six times over, 70 % generated text took PTB from 484 to 178 for WikiText-2 65.6 ->
# 74.1 (GPU). Budgets in between are not measured: the switch sits where the split starts repeating.
# Without a local corpus: the teacher's text alone.
DEFAULT_WITH_LOCAL_CORPUS = "wikitext2:valid"
DEFAULT_MIXTURE = "generated:0.7,wikitext2:valid:0.3"
MIXTURE_FROM_TOKENS = 268_279  # WikiText-2 validation in SmolLM2's tokenizer


@dataclass(frozen=True)
class DataSource:
    source: str
    weight: float

    @property
    def generated(self) -> bool:
        return self.source == GENERATED


def parse_data_spec(spec: str) -> list[DataSource]:
    """The sources of a spec, weights normalised to sum to 1; a bad spec raises ``LittleBitError``."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not spec or not all(parts):
        raise LittleBitError(f"bad data spec {spec!r}: expected SOURCE[:WEIGHT][,SOURCE[:WEIGHT]...]")
    sources: list[tuple[str, float]] = []
    for part in parts:
        name, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                if head == GENERATED:
                    raise LittleBitError(f"bad data spec {spec!r}: weight {tail!r} is not a number") from None
                # "wikitext2:valid": the colon belongs to the name
            else:
                name = head
        if not (weight > 0 and math.isfinite(weight)):
            raise LittleBitError(f"bad data spec {spec!r}: weight of {name!r} must be a finite number > 0")
        if _identity(name) in (_identity(s) for s, _ in sources):
            raise LittleBitError(f"bad data spec {spec!r}: {name!r} is named twice")
        if name != GENERATED:
            check_training_source(name)  # a hub source's form now, its rows when the run reads them
        sources.append((name, weight))
    if not math.isfinite(sum(w for _, w in sources)):  # weights near the float maximum: rescale first
        top = max(w for _, w in sources)
        sources = [(name, w / top) for name, w in sources]
    total = sum(w for _, w in sources)
    return [DataSource(name, w / total) for name, w in sources]


def _identity(source: str) -> str:
    """One name for one source: a local file or folder by its resolved path (``a.txt``, ``./a.txt``)."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def has_local_corpus() -> bool:
    """The WikiText-2 validation split is in one of the local data folders."""
    return any((d / "wikitext-2-raw" / "wiki.valid.raw").is_file() for d in default_data_dirs())


def default_data_spec(tokens: int | None = None) -> str:
    """The default data for a run reading ``tokens`` training tokens: where the local WikiText-2
    validation split is, the split alone up to ``MIXTURE_FROM_TOKENS``, else ``DEFAULT_MIXTURE``;
    generated text alone where no corpus is."""
    if not has_local_corpus():
        return GENERATED
    repeats = tokens is not None and tokens > MIXTURE_FROM_TOKENS
    return DEFAULT_MIXTURE if repeats else DEFAULT_WITH_LOCAL_CORPUS


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """``total`` split by ``weights`` in whole numbers (largest remainder), summing exactly to it."""
    raw = [w * total for w in weights]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
