"""Evaluation and training text: WikiText-2 and PTB from local files or Hugging Face ``datasets``,
the user's own text files, and any Hugging Face dataset (``evaluation.hub``).

Local files follow the layout of the shared data folder::

    DATA_DIR/wikitext-2-raw/wiki.{train,valid,test}.raw
    DATA_DIR/ptb/ptb.{train,valid,test}.txt

The text is assembled exactly as the GPTQ / LittleBit evaluation does (LITTLEBIT.md section 5).
"""

from __future__ import annotations

import os
from pathlib import Path

from littlebit.config import LittleBitError
from littlebit.evaluation.hub import HUB_HELP, hub_text, is_hub_source, parse_hub_source

DATASETS = ("wikitext2", "ptb")
_FILES = {
    "wikitext2": ("wikitext-2-raw", "wiki.{split}.raw"),
    "ptb": ("ptb", "ptb.{split}.txt"),
}
_HF = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
}


def default_data_dirs() -> list[Path]:
    """Where to look when no directory is given: $LITTLEBIT_DATA, then ``shared/data`` nearby."""
    dirs = []
    if env := os.environ.get("LITTLEBIT_DATA"):
        dirs.append(Path(env))
    here = Path.cwd()
    for base in (here, *here.parents):
        dirs += [base / "shared" / "data", base / ".dev-data"]
    return dirs


def wikitext_rows(path: Path) -> list[str]:
    """Rows as the HF ``wikitext`` loader yields them: each line, whitespace-only lines as ``""``."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def ptb_rows(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _local_file(name: str, split: str, data_dir: str | Path | None) -> Path | None:
    sub, pattern = _FILES[name]
    rel = Path(sub) / pattern.format(split=split)
    if data_dir is not None:
        path = Path(data_dir) / rel
        if not path.is_file():
            raise LittleBitError(f"data file not found: {path}")
        return path
    for d in default_data_dirs():
        if (d / rel).is_file():
            return d / rel
    return None


def _hf_rows(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise LittleBitError(
            f"no local {name} data found: pass --data-dir or set LITTLEBIT_DATA "
            "(or pip install 'littlebit[eval]' to fetch it from the Hugging Face hub)"
        ) from e
    repo, subset, column = _HF[name]
    hf_split = "validation" if split == "valid" else split
    try:
        return list(datasets.load_dataset(repo, subset, split=hf_split)[column])
    except Exception as e:  # the hub is unreachable, or the dataset moved: one line, not a traceback
        raise LittleBitError(f"cannot load {name} {split} from the Hugging Face hub: {e}") from e


def eval_text(name: str, split: str = "test", data_dir: str | Path | None = None) -> str:
    """The evaluation text of ``name`` in ``split`` joined as the GPTQ protocol does."""
    if name not in DATASETS:
        raise LittleBitError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    path = _local_file(name, split, data_dir)
    if path is None:
        rows = _hf_rows(name, split)
    else:
        rows = wikitext_rows(path) if name == "wikitext2" else ptb_rows(path)
    return "\n\n".join(rows)


def training_text(
    source: str | Path | None = None, data_dir: str | Path | None = None, max_tokens: int | None = None
) -> str:
    """Text to train on: a named split (``wikitext2:valid``), a text file, a directory of them, or a
    Hugging Face dataset (``hf:NAME...``, its train split unless named, read as far as ``max_tokens``
    tokens need).

    The default is WikiText-2's validation split: the shared data has no train split, and test is
    kept for evaluation.
    """
    source = "wikitext2:valid" if source is None else str(source)
    if ":" in source and source.split(":", 1)[0] in DATASETS:
        name, split = source.split(":", 1)
        return eval_text(name, split, data_dir)
    if source in DATASETS:
        return eval_text(source, "train", data_dir)
    if is_hub_source(source):
        return hub_text(source, "train", max_tokens)
    text = _local_text(Path(source))
    if text is None:
        raise LittleBitError(f"training data not found: {source}")
    return text


SPLITS = ("train", "valid", "test")


def check_training_source(source: str) -> None:
    """Refuse, before anything loads, a training text source that ``training_text`` cannot read."""
    if not source.strip():  # Path("") is the current directory, whose text files nobody meant
        raise LittleBitError("the training text source is empty")
    name, _, split = source.partition(":")
    if name in DATASETS:
        if split and split not in SPLITS:
            raise LittleBitError(f"unknown split {split!r} of {name}: choose from {', '.join(SPLITS)}")
        return
    if is_hub_source(source):
        parse_hub_source(source)
        return
    if not (Path(source).is_file() or Path(source).is_dir()):
        raise LittleBitError(
            f"training data not found: {source} (expected generated, "
            f"{', '.join(d + '[:SPLIT]' for d in DATASETS)}, a text file or folder, or {HUB_HELP})"
        )


def check_test_set(source: str) -> None:
    """Refuse, before anything loads, a perplexity test set that ``test_set_text`` cannot read."""
    if source in DATASETS or (source.strip() and (Path(source).is_file() or Path(source).is_dir())):
        return
    if is_hub_source(source):
        parse_hub_source(source)
        return
    raise LittleBitError(
        f"unknown test set {source!r}: {', '.join(DATASETS)}, a text file or folder, or {HUB_HELP}"
    )


def test_set_text(
    source: str, data_dir: str | Path | None = None, max_tokens: int | None = None
) -> tuple[str, str | None]:
    """A perplexity test set and the split it came from: a named dataset's test split, a Hugging Face
    dataset's (test unless named, read as far as ``max_tokens`` need), or a text file or folder (no split)."""
    check_test_set(source)
    if source in DATASETS:
        return eval_text(source, "test", data_dir), "test"
    if is_hub_source(source):
        split = parse_hub_source(source).split or "test"
        return hub_text(source, split, max_tokens), split
    text = _local_text(Path(source))
    if text is None:
        raise LittleBitError(f"test set not found: {source}")
    return text, None


def _local_text(path: Path) -> str | None:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".raw", ".md"))
        if not files:
            raise LittleBitError(f"no .txt/.raw/.md files in {path}")
        return "\n\n".join(_read_text(p) for p in files)
    if path.is_file():
        return _read_text(path)
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LittleBitError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LittleBitError(f"cannot read {path}: {e.strerror or e}") from None
