"""Text from any Hugging Face dataset, for users who have the hub: ``hf:NAME[?config=C&split=S&column=COL]``.

``hf:allenai/c4?config=en&split=validation`` names the ``text`` column of C4's English validation
split. Rows are streamed (nothing beyond what is read is downloaded) and joined with blank lines, up
to what ``max_tokens`` tokens need when the caller knows it. The dataset's own loading code never runs:
``datasets`` is not asked to trust remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

from littlebit.config import LittleBitError

HUB_PREFIX = "hf:"
# Characters to stream for each token a caller asks for: English runs about 4 a token in the tokenizers
# of this field; twice that leaves room for denser text.
_CHARS_PER_TOKEN = 8
HUB_HELP = "hf:NAME[?config=C&split=S&column=COL] (a Hugging Face dataset; column text by default)"
_KEYS = ("config", "split", "column")


@dataclass(frozen=True)
class HubText:
    name: str
    config: str | None
    split: str | None
    column: str


def is_hub_source(source: str) -> bool:
    return str(source).startswith(HUB_PREFIX)


def parse_hub_source(source: str) -> HubText:
    """The parts of ``hf:NAME[?key=value&...]``; a malformed one raises ``LittleBitError``."""
    name, _, query = str(source)[len(HUB_PREFIX) :].partition("?")
    if not name or any(c.isspace() for c in name):
        raise LittleBitError(f"bad dataset {source!r}: expected {HUB_HELP}")
    params: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        if not eq or key not in _KEYS or not value or key in params:
            options = ", ".join(k + "=..." for k in _KEYS)
            raise LittleBitError(f"bad dataset {source!r}: options are {options}, each at most once")
        params[key] = value
    return HubText(name, params.get("config"), params.get("split"), params.get("column", "text"))


def hub_text(source: str, default_split: str, max_tokens: int | None = None) -> str:
    """The rows of the source's text column joined with blank lines: enough for ``max_tokens`` tokens
    when the split holds that many, else all of them."""
    spec = parse_hub_source(source)
    max_chars = None if max_tokens is None else max_tokens * _CHARS_PER_TOKEN
    try:
        import datasets
    except ImportError as e:
        raise LittleBitError(f"{source} needs the datasets package: pip install 'littlebit[eval]'") from e
    split = spec.split or default_split
    parts: list[str] = []
    size = 0
    try:
        for row in datasets.load_dataset(spec.name, spec.config, split=split, streaming=True):
            if spec.column not in row:
                has = ", ".join(row)
                raise LittleBitError(f"{source} has no column {spec.column!r} (it has {has}): pass column=")
            text = row[spec.column]
            if text is None:  # an empty row in many hub datasets
                continue
            if not isinstance(text, str):
                kind = type(text).__name__
                raise LittleBitError(f"{source}: column {spec.column!r} holds {kind}, not text")
            parts.append(text)
            size += len(text) + 2
            if max_chars is not None and size >= max_chars:
                break
    except LittleBitError:
        raise
    except Exception as e:  # the hub is unreachable, the name or split is wrong: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LittleBitError(f"cannot load {spec.name} ({split}) from the Hugging Face hub: {reason}") from e
    if not parts:
        raise LittleBitError(f"{source} ({split}) has no rows")
    return "\n\n".join(parts)
