"""Data specs without torch: what ``--data`` names, checked before anything heavy loads.

``SOURCE[:WEIGHT],SOURCE[:WEIGHT],...``, where ``SOURCE`` is ``generated``, a named split
(``wikitext2:valid``), a text file or a folder of them (``training.data`` reads them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from littlebit.config import LittleBitError
from littlebit.evaluation.data import default_data_dirs

GENERATED = "generated"
# With a local WikiText-2 validation split, the data the default recipe was measured on; without a
# local corpus, the teacher's text alone. Mixtures with generated text stay opt-in (``--data``) until
# the held-out benchmark (benchmarks/qat.py, the data-* variants) shows one scoring better.
DEFAULT_WITH_LOCAL_CORPUS = "wikitext2:valid"


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
                pass  # "wikitext2:valid": the colon belongs to the name
            else:
                name = head
        if not (weight > 0 and math.isfinite(weight)):
            raise LittleBitError(f"bad data spec {spec!r}: weight of {name!r} must be a finite number > 0")
        if name in (s for s, _ in sources):
            raise LittleBitError(f"bad data spec {spec!r}: {name!r} is named twice")
        sources.append((name, weight))
    total = sum(w for _, w in sources)
    return [DataSource(name, w / total) for name, w in sources]


def default_data_spec() -> str:
    """The local WikiText-2 validation split when it is here, else generated text alone."""
    local = any((d / "wikitext-2-raw" / "wiki.valid.raw").is_file() for d in default_data_dirs())
    return DEFAULT_WITH_LOCAL_CORPUS if local else GENERATED


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """``total`` split by ``weights`` in whole numbers (largest remainder), summing exactly to it."""
    raw = [w * total for w in weights]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
