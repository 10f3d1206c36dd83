"""Bit budget: the rank a target BPW buys, and what each layer really costs.

Per path, a ``d_out x d_in`` layer of rank ``r`` stores ``r * (d_in + d_out)`` sign bits and
``d_in + d_out + r`` 16-bit scales; the residual path doubles both (LITTLEBIT.md section 4).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from littlebit.config import check_bpw

SCALE_BITS = 16
WORD_BITS = 32


def n_paths(residual: bool) -> int:
    return 2 if residual else 1


def layer_bits(d_in: int, d_out: int, rank: int, residual: bool) -> int:
    """Exact bits of one layer: signs plus the three scale vectors, per path."""
    return n_paths(residual) * (rank * (d_in + d_out) + SCALE_BITS * (d_in + d_out + rank))


def layer_bpw(d_in: int, d_out: int, rank: int, residual: bool) -> float:
    return layer_bits(d_in, d_out, rank, residual) / (d_in * d_out)


def max_useful_rank(d_in: int, d_out: int, multiple: int = 8) -> int:
    return max(multiple, (min(d_in, d_out) // multiple) * multiple)


def rank_for_bpw(
    d_in: int, d_out: int, bpw: float, residual: bool, multiple: int = 8, min_rank: int = 8
) -> int:
    """Largest rank whose cost fits ``bpw``, floored to ``multiple``, at least ``min_rank``.

    Ranks above ``min(d_in, d_out)`` add bits but no expressiveness, so the rank is capped there.
    """
    check_bpw(bpw)
    p = n_paths(residual)
    free_bits = bpw * d_in * d_out - p * SCALE_BITS * (d_in + d_out)
    raw = math.floor(free_bits / (p * (d_in + d_out + SCALE_BITS)) + 1e-9)
    rank = (raw // multiple) * multiple
    return max(min_rank, min(rank, max_useful_rank(d_in, d_out, multiple)))


def packed_bytes(d_in: int, d_out: int, rank: int, residual: bool, scale_bytes: int = 2) -> int:
    """Bytes of the packed storage: signs in 32-bit words along each product's reduction axis."""
    words_u = d_out * math.ceil(rank / WORD_BITS)
    words_v = rank * math.ceil(d_in / WORD_BITS)
    per_path = 4 * (words_u + words_v) + scale_bytes * (d_in + d_out + rank)
    return n_paths(residual) * per_path


@dataclass
class LayerBudget:
    name: str
    d_in: int
    d_out: int
    rank: int
    residual: bool
    target_bpw: float

    @property
    def bits(self) -> int:
        return layer_bits(self.d_in, self.d_out, self.rank, self.residual)

    @property
    def bpw(self) -> float:
        return self.bits / self.n_weights

    @property
    def bytes(self) -> int:
        return packed_bytes(self.d_in, self.d_out, self.rank, self.residual)

    @property
    def n_weights(self) -> int:
        return self.d_in * self.d_out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(shape=[self.d_out, self.d_in], bpw=self.bpw, bits=self.bits, bytes=self.bytes)
        return d


@dataclass
class ModelBudget:
    layers: list[LayerBudget]
    n_params: int  # every parameter of the original model, embeddings and head included
    n_other_params: int  # parameters that stay in 16 bits

    @property
    def bpw_linear(self) -> float:
        """BPW as the paper reports it: over the converted linear layers only."""
        weights = sum(layer.n_weights for layer in self.layers)
        return sum(layer.bits for layer in self.layers) / weights if weights else 0.0

    @property
    def bpw_total(self) -> float:
        """Over every weight of the model, with the 16-bit embeddings, head and norms."""
        bits = sum(layer.bits for layer in self.layers) + SCALE_BITS * self.n_other_params
        return bits / self.n_params if self.n_params else 0.0

    def over_budget(self) -> list[LayerBudget]:
        """Layers whose cost at the smallest allowed rank already exceeds their target."""
        return [layer for layer in self.layers if layer.bpw > layer.target_bpw + 1e-9]

    def warning(self) -> str | None:
        """Names every layer over its target, grouped as ``model.layers.[0-29].mlp.up_proj``."""
        bad = self.over_budget()
        if not bad:
            return None
        groups: dict[tuple, list[int]] = {}
        for b in bad:
            m = re.search(r"\.(\d+)\.", b.name)
            pattern = b.name[: m.start(1)] + "{}" + b.name[m.end(1) :] if m else b.name
            key = (pattern, b.d_out, b.d_in, round(b.bpw, 3), b.target_bpw)
            groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
        parts = [
            f"{pattern.format(_ranges(idx))} ({d_out}x{d_in}: {bpw:.3f} > {target:.3f})"
            for (pattern, d_out, d_in, bpw, target), idx in groups.items()
        ]
        head = f"{len(bad)} layer(s) cannot reach their BPW target even at the minimum rank: "
        return head + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "bpw_linear": self.bpw_linear,
            "bpw_total": self.bpw_total,
            "n_params": self.n_params,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def table(self) -> str:
        rows = [f"{'layer':<48} {'shape':>12} {'rank':>5} {'bpw':>7} {'bytes':>10}"]
        for b in self.layers:
            rows.append(f"{b.name:<48} {f'{b.d_out}x{b.d_in}':>12} {b.rank:>5} {b.bpw:>7.4f} {b.bytes:>10}")
        rows.append(f"BPW over converted linear layers: {self.bpw_linear:.4f}")
        rows.append(f"BPW over all weights (embeddings, head, norms at 16 bits): {self.bpw_total:.4f}")
        return "\n".join(rows)


def _ranges(indices: list[int]) -> str:
    """``[0-3,7]`` for indices 0,1,2,3,7; a single index stays bare."""
    if indices == [-1]:
        return ""
    idx = sorted(set(indices))
    spans, start = [], idx[0]
    for prev, cur in zip(idx, [*idx[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return spans[0] if len(idx) == 1 else "[" + ",".join(spans) + "]"
