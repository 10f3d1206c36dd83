"""What to compress and how: a versioned, JSON-serialisable configuration."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1
SIGN_FUNCTIONS = ("smooth", "ste")
INIT_METHODS = ("dual-svid", "itq", "itq-refined")


class LittleBitError(ValueError):
    """Bad user input: the CLI prints it as one line and exits with code 2."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type where it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class LayerOverride:
    """Settings for the modules whose qualified name matches a glob ``pattern``.

    ``bpw`` replaces the target for those layers; ``rank`` fixes the rank outright.
    """

    pattern: str
    bpw: float | None = None
    rank: int | None = None


@dataclass
class LittleBitConfig:
    """How a model is compressed.

    ``bpw`` is the bit budget per weight of each converted linear layer, scales included.
    ``kv_rank_multiplier`` scales the rank of k/v projections relative to the rank the budget gives.
    ``attention_bpw_factor`` moves bits between kinds of layers: the attention projections get that
    multiple of ``bpw``, the other layers what keeps the mean over all weights at ``bpw``.
    ``skip`` lists glob patterns of module names left in full precision.
    """

    bpw: float = 0.55
    residual: bool = True
    kv_rank_multiplier: float = 1.0
    attention_bpw_factor: float = 1.0
    overrides: list[LayerOverride] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    sign_function: str = "smooth"
    smooth_alpha: float = 100.0
    init: str = "dual-svid"
    seed: int = 0
    rank_multiple: int = 8
    min_rank: int = 8
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, list) or not all(
            isinstance(o, (dict, LayerOverride)) for o in self.overrides
        ):
            raise LittleBitError("overrides must be a list of {pattern, bpw, rank} objects")
        self.overrides = [o if isinstance(o, LayerOverride) else _override(o) for o in self.overrides]
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        check_bpw(self.bpw)
        for o in self.overrides:
            if o.bpw is not None:
                check_bpw(o.bpw)
            if o.rank is not None and o.rank < 1:
                raise LittleBitError(f"override {o.pattern!r}: rank must be >= 1, got {o.rank}")
        if self.sign_function not in SIGN_FUNCTIONS:
            raise LittleBitError(f"sign_function must be one of {SIGN_FUNCTIONS}, got {self.sign_function!r}")
        if self.init not in INIT_METHODS:
            raise LittleBitError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        for name in ("kv_rank_multiplier", "attention_bpw_factor"):
            value = getattr(self, name)
            # Written to also refuse NaN, which compares false with everything.
            if not (value > 0 and math.isfinite(value)):
                raise LittleBitError(f"{name} must be a finite number > 0, got {value}")
        if not (self.smooth_alpha > 0 and math.isfinite(self.smooth_alpha)):
            raise LittleBitError(f"smooth_alpha must be a finite number > 0, got {self.smooth_alpha}")
        if self.rank_multiple < 1 or self.min_rank < 1:
            raise LittleBitError(
                f"rank_multiple and min_rank must be >= 1, got {self.rank_multiple}, {self.min_rank}"
            )
        if not 0 <= self.seed < 2**63:
            raise LittleBitError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.version < 1:
            raise LittleBitError(f"config version must be >= 1, got {self.version}")
        if self.version > CONFIG_VERSION:
            raise LittleBitError(
                f"config version {self.version} is newer than this littlebit understands ({CONFIG_VERSION})"
            )

    def is_skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def override_for(self, name: str) -> LayerOverride | None:
        """The last matching override wins, so later, more specific patterns refine earlier ones."""
        found = None
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                found = o
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LittleBitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LittleBitError(f"unknown LittleBit config keys: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LittleBitConfig:
        return cls.from_dict(json.loads(text))


_FIELD_KINDS = {
    "bpw": float,
    "residual": bool,
    "kv_rank_multiplier": float,
    "attention_bpw_factor": float,
    "skip": list,
    "sign_function": str,
    "smooth_alpha": float,
    "init": str,
    "seed": int,
    "rank_multiple": int,
    "min_rank": int,
    "version": int,
}


def _is_kind(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(config: LittleBitConfig) -> None:
    """A config read from a file may hold any JSON: refuse wrong types before they are used."""
    for name, kind in _FIELD_KINDS.items():
        value = getattr(config, name)
        if not _is_kind(value, kind):
            raise LittleBitError(f"{name} must be {kind.__name__}, got {value!r}")
    if not all(isinstance(p, str) for p in config.skip):
        raise LittleBitError(f"skip must be a list of module name patterns, got {config.skip!r}")


def _override(data: dict[str, Any]) -> LayerOverride:
    try:
        o = LayerOverride(**data)
    except TypeError:
        raise LittleBitError(f"override {data!r}: expected the keys pattern, bpw, rank") from None
    if not isinstance(o.pattern, str):
        raise LittleBitError(f"override pattern must be a string, got {o.pattern!r}")
    if o.bpw is not None and not _is_kind(o.bpw, float):
        raise LittleBitError(f"override {o.pattern!r}: bpw must be a number, got {o.bpw!r}")
    if o.rank is not None and not _is_kind(o.rank, int):
        raise LittleBitError(f"override {o.pattern!r}: rank must be an integer, got {o.rank!r}")
    return o


def check_bpw(bpw: float) -> None:
    if not (0 < bpw < 16):
        raise LittleBitError(f"bits per weight must be in (0, 16), got {bpw}")
