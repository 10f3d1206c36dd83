"""Training checkpoints: tensors in safetensors, everything else in a small JSON file. No pickle.

A checkpoint is ``state-<tag>.safetensors`` plus ``train_state.json`` naming it. Each file is written
to a temporary name, flushed to disk and moved into place with ``os.replace``; the JSON goes last,
so at every instant the JSON names a complete tensor file, and a run killed at any point resumes
from the last checkpoint it finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import LittleBitError

STATE_JSON = "train_state.json"
STATE_VERSION = 1


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, tag: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one checkpoint and drop the tensor files of older ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{tag}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    _fsync(tmp)
    os.replace(tmp, directory / name)
    write_json_atomic(directory / STATE_JSON, {**meta, "version": STATE_VERSION, "tensors": name})
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / name


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, meta)`` of the last complete checkpoint, or None where there is none."""
    path = Path(directory) / STATE_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LittleBitError(f"corrupt training state {path}: {e}") from e
    if meta.get("version", 0) > STATE_VERSION:
        raise LittleBitError(f"training state {path} is from a newer littlebit (version {meta['version']})")
    tensor_file = Path(directory) / meta["tensors"]
    if not tensor_file.is_file():
        raise LittleBitError(f"training state {path} names a missing file {tensor_file.name}")
    return load_file(str(tensor_file)), meta


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as ``optim.<param index>.<key>`` tensors plus JSON-ready metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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
