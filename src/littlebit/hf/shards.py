"""Reading a safetensors checkpoint one tensor at a time, without mapping its files into memory.

``safe_open`` maps whole shard files: every page it touches stays resident (and counted in the
process's RSS) until the file is closed, so reading a 13 GB checkpoint layer by layer through it
grows the footprint towards the shard size. Here each tensor is read with ``pread`` into its own
buffer, and freeing the tensor frees its memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from littlebit.config import LittleBitError, first_line

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The hub files a streamed compression needs: the weights in safetensors, configs and tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int


def read_header(file: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors a safetensors file holds (from its header only) and its metadata."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise LittleBitError(f"{file.name}: tensor {name} has unsupported dtype {info['dtype']}")
            lo, hi = info["data_offsets"]
            entries[name] = TensorEntry(
                file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + lo, 8 + n + hi
            )
    except LittleBitError:
        raise
    except PermissionError:
        raise LittleBitError(f"cannot read {file}: permission denied") from None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise LittleBitError(f"cannot read {file}: damaged or not safetensors ({first_line(e)})") from e
    return entries, metadata


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files a load reads, as transformers picks them: the index's shards, else
    ``model.safetensors``, else every ``*.safetensors`` file (a folder saved another way)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LittleBitError(f"cannot read {index}: {first_line(e)}") from e
    elif (directory / SINGLE_NAME).is_file():
        files = [directory / SINGLE_NAME]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LittleBitError(f"{directory} holds no safetensors files")
    return files


class SafetensorsCheckpoint:
    """The tensors of a model directory's safetensors files, by name (sharded or single file)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._read_headers(weight_files(self.directory))

    @classmethod
    def from_files(cls, files: list[Path]) -> SafetensorsCheckpoint:
        """The tensors of the given files only."""
        self = cls.__new__(cls)
        self.directory = files[0].parent
        self._read_headers(files)
        return self

    def _read_headers(self, files: list[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            self.entries.update(read_header(file)[0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype (then converted to ``dtype``, if given)."""
        e = self.entries[name]
        size = e.end - e.start
        buf = bytearray(size)
        fd = os.open(e.file, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < size:
                n = os.preadv(fd, [view[done:]], e.start + done)
                if n == 0:
                    raise LittleBitError(f"{e.file.name} is truncated (tensor {name})")
                done += n
        finally:
            os.close(fd)
        if size == 0:
            t = torch.empty(e.shape, dtype=e.dtype)
        else:
            t = torch.frombuffer(buf, dtype=torch.uint8).view(e.dtype).reshape(e.shape)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t


def is_safetensors_dir(path: Path) -> bool:
    return path.is_dir() and ((path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")))


def locate_safetensors(model: str | None) -> Path | None:
    """The local directory holding ``model``'s safetensors checkpoint, downloading a hub id's
    safetensors, configs and tokenizer files; None where there is none (a GGUF file, a checkpoint in
    another format, a hub id that cannot be reached), for the caller to load it whole instead."""
    if model is None or model.endswith(".gguf"):
        return None
    path = Path(model)
    if path.exists():
        return path if is_safetensors_dir(path) else None
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception:  # offline, unknown id, not a repo name: the whole-model loader says why
        return None
    return local if is_safetensors_dir(local) else None
