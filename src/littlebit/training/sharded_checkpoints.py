"""Checkpoints of a sharded run: ``torch.distributed.checkpoint`` files plus a JSON of the position.

Checkpoint ``<tag>`` is the directory ``dcp-<tag>``: every rank writes its own shards of the trained
tensors, the optimizer state and its RNG state into it (DCP's own format and metadata, no pickle
of model data), and rank 0 adds ``checkpoint.json``: the run's position, the optimizer's groups by
parameter name, a digest of every file and of its own content. The directory is written under the
temporary name ``dcp-<tag>.partial`` and renamed into place by rank 0 once every rank has written
its part and the JSON is on disk, so a kill at any instant leaves either a whole checkpoint or a
``.partial`` directory, which the next start removes. DCP reshards on load: a run may be resumed on
another number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from littlebit.config import LittleBitError
from littlebit.hf.verification import file_digest
from littlebit.training.checkpoints import phase_order

FORMAT_VERSION = 1
META_NAME = "checkpoint.json"
_NAME = re.compile(r"dcp-(blocks|global)-(\d+)")
_PARTIAL = ".partial"


def _order(path: Path) -> tuple[int, int]:
    return phase_order(path, _NAME, "a sharded training checkpoint (dcp-<phase>-<n>)")


def list_sharded(directory: str | Path) -> list[Path]:
    """The checkpoint directories in ``directory`` that hold their JSON, oldest first."""
    found = [
        p for p in Path(directory).glob("dcp-*") if _NAME.fullmatch(p.name) and (p / META_NAME).is_file()
    ]
    return sorted(found, key=_order)


def partial_path(directory: str | Path, tag: str) -> Path:
    return Path(directory) / f"dcp-{tag}{_PARTIAL}"


def remove_partial(directory: str | Path) -> list[str]:
    """Delete what killed writes left: ``.partial`` directories and checkpoint directories without JSON."""
    directory = Path(directory)
    stale = [p for p in directory.glob(f"dcp-*{_PARTIAL}") if p.is_dir()]
    stale += [p for p in directory.glob("dcp-*") if _NAME.fullmatch(p.name) and not (p / META_NAME).is_file()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in stale)


def remove_sharded(directory: str | Path, after: Path | None = None) -> list[str]:
    """Delete every sharded checkpoint (or those newer than ``after``)."""
    gone = [p for p in list_sharded(directory) if after is None or _order(p) > _order(after)]
    for p in gone:
        _remove(p)
    return [p.name for p in gone]


def _remove(path: Path) -> None:
    # The JSON first: a kill in between leaves a directory without JSON, which counts as stale.
    (path / META_NAME).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_sharded(directory: str | Path, tag: str, meta: dict, keep: int = 2) -> Path:
    """Rank 0, after every rank wrote ``partial_path(tag)``: add the JSON, rename, prune; the directory."""
    directory = Path(directory)
    tmp, final = partial_path(directory, tag), directory / f"dcp-{tag}"
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in files:
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    record = {**meta, "version": FORMAT_VERSION, "file_digests": {p.name: file_digest(p) for p in files}}
    record["meta_digest"] = _meta_digest(record)
    (tmp / META_NAME).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    with open(tmp / META_NAME, "rb+") as f:
        os.fsync(f.fileno())
    if final.exists():  # a checkpoint of the same tag from a run being redone
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    if keep > 0:
        for old in list_sharded(directory)[:-keep]:
            _remove(old)
    return final


def _read_meta(path: Path) -> dict:
    """The JSON of checkpoint directory ``path``, its digest and every file's checked; ValueError if not."""
    try:
        meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("meta_digest") != _meta_digest(meta):
        raise ValueError("its JSON does not match its digest")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')}, this littlebit reads {FORMAT_VERSION}")
    digests = meta.get("file_digests") or {}
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != META_NAME}
    if present != set(digests):
        raise ValueError("its files are not the ones its JSON lists")
    for name, digest in digests.items():
        if file_digest(path / name) != digest:
            raise ValueError(f"file {name} does not match its digest")
    return meta


def load_sharded_meta(directory: str | Path, path: str | Path | None = None) -> tuple[dict, Path] | None:
    """``(meta, checkpoint dir)`` of ``path`` (a ``dcp-*`` directory or its JSON), else of the newest.

    None if there is none; a damaged one is refused, naming the newest good checkpoint before it.
    """
    directory = Path(directory)
    found = list_sharded(directory)
    if path is None:
        if not found:
            return None
        path = found[-1]
    path = Path(path)
    path = path.parent if path.name == META_NAME else path
    _order(path)
    if path.resolve().parent != directory.resolve():
        raise LittleBitError(f"checkpoint {path} is not in the work dir {directory}")
    if not (path / META_NAME).is_file():
        raise LittleBitError(f"no checkpoint {path}")
    try:
        return _read_meta(path), path
    except ValueError as e:
        earlier = [p for p in found if _order(p) < _order(path)]
        good = next((p for p in reversed(earlier) if _is_good(p)), None)
        hint = (
            f"the previous good checkpoint is {good}: resume from it with --resume-from {good}"
            if good is not None
            else "no earlier good checkpoint is kept: start again in an empty work dir"
        )
        raise LittleBitError(f"checkpoint {path} is damaged ({' '.join(str(e).split())}); {hint}") from None


def _is_good(path: Path) -> bool:
    try:
        _read_meta(path)
    except ValueError:
        return False
    return True


def position_meta(trainer: Any) -> dict:
    """What a checkpoint records beside the tensors: the same fields as a single-process checkpoint."""
    return {
        "phase": trainer.phase,
        "step": trainer.step,
        "next_block": trainer.next_block,
        "position": trainer.position,
        "tokens": trainer.tokens,
        "history": trainer.history,
        "train_config": trainer.config.to_dict(),
        "littlebit_config": trainer.lb_config.to_dict(),
        "data": trainer._data_fingerprint(),
    }
