"""Training checkpoints: tensors in safetensors, everything else in a JSON file beside them. No pickle.

Checkpoint ``<tag>`` is ``state-<tag>.safetensors`` plus ``state-<tag>.json``. The JSON holds the
run's position, the optimizer's parameter groups by parameter name, a digest of every tensor and a
digest of its own content; all are checked before a run resumes. Each file is written to a
temporary name, flushed and moved into place with ``os.replace``, the JSON last: a checkpoint exists
once its JSON does, and a kill at any instant leaves at worst a ``*.tmp`` or a tensor file without
JSON, which the next start removes. The newest ``keep`` checkpoints stay on disk, so when the newest
is damaged the one before it can still be resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from littlebit.config import LittleBitError
from littlebit.hf.verification import tensor_digest
from littlebit.training.optim import make_optimizer

STATE_VERSION = 2
LEGACY_JSON = "train_state.json"  # version 1: optimizer state by position, no digests
_NAME = re.compile(r"state-(blocks|global)-(\d+)\.json")
PHASES = ("blocks", "global")
# Chosen by the optimizer's constructor from the device it runs on, not part of what was trained.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class Checkpoint(NamedTuple):
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path  # its JSON file


class _Damaged(Exception):
    pass


def phase_order(path: Path, name: re.Pattern, kind: str) -> tuple[int, int]:
    """(phase, step) of a checkpoint whose file name ``name`` matches as (phase, step); a one-line
    error naming ``kind`` for any other name."""
    m = name.fullmatch(path.name)
    if m is None:
        raise LittleBitError(f"{path} is not {kind}")
    return PHASES.index(m.group(1)), int(m.group(2))


def _order(path: Path) -> tuple[int, int]:
    return phase_order(path, _NAME, "a training checkpoint (state-<phase>-<n>.json)")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The JSON files of the checkpoints in ``directory``, oldest first."""
    found = [p for p in Path(directory).glob("state-*.json") if _NAME.fullmatch(p.name)]
    return sorted(found, key=_order)


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: str | Path, tag: str, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``tag`` and delete all but the newest ``keep`` (0: keep all); its JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tensor_path, json_path = directory / f"state-{tag}.safetensors", directory / f"state-{tag}.json"
    record = {**meta, "version": STATE_VERSION, "tensors": tensor_path.name}
    record["tensor_digests"] = {k: tensor_digest(v) for k, v in sorted(cpu.items())}
    record["meta_digest"] = _meta_digest(record)
    text = json.dumps(record, indent=1, sort_keys=True)
    # A JSON must never name a tensor file other than the one it was written with.
    json_path.unlink(missing_ok=True)
    try:
        _write_atomic(tensor_path, lambda tmp: save_file(cpu, str(tmp)))
        _write_atomic(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except (OSError, SafetensorError) as e:
        tensor_path.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LittleBitError(f"cannot write checkpoint {json_path}: {reason}") from None
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            _remove(old)
    return json_path


def _remove(json_path: Path) -> None:
    # JSON first: a kill in between leaves an orphan tensor file, never a JSON without its tensors.
    json_path.unlink(missing_ok=True)
    json_path.with_suffix(".safetensors").unlink(missing_ok=True)


def remove_stale(directory: str | Path) -> list[str]:
    """Delete what killed writes left behind: temporary files and tensor files without a JSON."""
    directory = Path(directory)
    stale = list(directory.glob("state-*.tmp"))
    stale += [p for p in directory.glob("state-*.safetensors") if not p.with_suffix(".json").is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


def remove_checkpoints(directory: str | Path, after: Path | None = None) -> list[str]:
    """Delete every checkpoint (or those newer than ``after``) and the legacy state file."""
    gone = [p for p in list_checkpoints(directory) if after is None or _order(p) > _order(after)]
    for p in gone:
        _remove(p)
    if after is None:
        (Path(directory) / LEGACY_JSON).unlink(missing_ok=True)
    return [p.name for p in gone]


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of one checkpoint, every digest checked; ``_Damaged`` says what is wrong."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damaged(f"unreadable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("meta_digest") != _meta_digest(meta):
        raise _Damaged("its JSON does not match its digest")
    if meta.get("version") != STATE_VERSION:
        raise _Damaged(f"format version {meta.get('version')}, this littlebit reads {STATE_VERSION}")
    tensor_path = path.with_name(str(meta.get("tensors")))
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as e:
        raise _Damaged(f"{tensor_path.name} is missing or truncated: {e}") from None
    digests = meta.get("tensor_digests") or {}
    if set(digests) != set(tensors):
        raise _Damaged(f"{tensor_path.name} holds other tensors than its JSON lists")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != digests[name]:
            raise _Damaged(f"tensor {name} does not match its digest")
    return tensors, meta


def _is_good(path: Path) -> bool:
    try:
        _read_checkpoint(path)
    except _Damaged:
        return False
    return True


def load_checkpoint(directory: str | Path, path: str | Path | None = None) -> Checkpoint | None:
    """Checkpoint ``path`` (its JSON or tensor file), else the newest in ``directory``; None if none.

    A damaged one is refused, naming the newest good checkpoint before it.
    """
    directory = Path(directory)
    found = list_checkpoints(directory)
    if path is None:
        if not found:
            if (directory / LEGACY_JSON).is_file():
                raise LittleBitError(
                    f"the training state in {directory} is from an older littlebit and cannot be resumed"
                    " exactly: start again in an empty work dir"
                )
            return None
        path = found[-1]
    given, path = Path(path), Path(path).with_suffix(".json")
    if _NAME.fullmatch(path.name) is None:
        raise LittleBitError(f"{given} is not a training checkpoint (state-<phase>-<n>.json or .safetensors)")
    if path.resolve().parent != directory.resolve():
        raise LittleBitError(f"checkpoint {path} is not in the work dir {directory}")
    if not path.is_file():
        raise LittleBitError(f"no checkpoint {path}")
    try:
        tensors, meta = _read_checkpoint(path)
    except _Damaged as e:
        earlier = [p for p in found if _order(p) < _order(path)]
        good = next((p for p in reversed(earlier) if _is_good(p)), None)
        hint = (
            f"the previous good checkpoint is {good}: resume from it with --resume-from {good}"
            if good is not None
            else "no earlier good checkpoint is kept: start again in an empty work dir"
        )
        reason = " ".join(str(e).split())  # one line, whatever the reader's message held
        raise LittleBitError(f"checkpoint {path} is damaged ({reason}); {hint}") from None
    return Checkpoint(tensors, meta, path)


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer as ``optim.<param name>.<key>`` tensors plus JSON: its groups by parameter name."""
    tensors, scalars, groups = {}, {}, []
    for group in optimizer.param_groups:
        members = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
        for p, name in zip(group["params"], members, strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{name}.{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    tensors: dict[str, torch.Tensor], meta: dict, params: dict[str, nn.Parameter], kinds: dict[str, str]
) -> torch.optim.AdamW:
    """The saved optimizer over ``params`` (by name): its groups as saved and each state on its tensor.

    ``kinds`` maps each parameter this run trains to its kind; the saved groups must cover exactly
    those, each in a group of the same kind.
    """
    order = [name for g in meta["param_groups"] for name in g["params"]]
    if len(set(order)) != len(order) or set(order) != set(kinds):
        odd = sorted(set(order) ^ set(kinds)) or sorted({n for n in order if order.count(n) > 1})
        raise LittleBitError(f"the checkpoint's optimizer does not cover the trained tensors: {odd[:3]}")
    for g in meta["param_groups"]:
        wrong = [n for n in g["params"] if kinds[n] != g.get("kind")]
        if wrong:
            raise LittleBitError(f"the checkpoint's optimizer puts {wrong[0]} in a {g.get('kind')} group")
    groups = [
        {
            **{k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS},
            "params": [params[n] for n in g["params"]],
            **({"betas": tuple(g["betas"])} if "betas" in g else {}),
        }
        for g in meta["param_groups"]
    ]
    optimizer = make_optimizer(groups)
    state: dict[int, dict[str, Any]] = {}
    index = {name: i for i, name in enumerate(order)}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, field = key[len("optim.") :].rsplit(".", 1)
        if name not in index:
            raise LittleBitError(f"the checkpoint has optimizer state for an unknown tensor {name}")
        if value.dim() > 0 and value.shape != params[name].shape:
            shape, want = tuple(value.shape), tuple(params[name].shape)
            raise LittleBitError(f"optimizer state {key} has shape {shape}, the tensor has {want}")
        state.setdefault(index[name], {})[field] = value
    for name, values in meta["scalars"].items():
        if name not in index:
            raise LittleBitError(f"the checkpoint has optimizer state for an unknown tensor {name}")
        state.setdefault(index[name], {}).update(values)
    # The optimizer numbers its parameters in group order, as ``order`` does.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
