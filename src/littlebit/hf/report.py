"""What a saved LittleBit checkpoint holds: BPW per layer, sizes on disk, expected and in memory."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from littlebit.config import LittleBitError, first_line
from littlebit.core.budget import SCALE_BITS, LayerBudget, ModelBudget, packed_bytes
from littlebit.hf.format import scale_dtype_from_name
from littlebit.hf.shards import read_header, weight_files


def read_quant_config(path: Path, allow_unverified: bool = False) -> dict:
    """The checkpoint's ``quantization_config``, checked against its digest and for well-formed specs."""
    from littlebit.hf.checkpoint import require_littlebit
    from littlebit.hf.quantizer import LittleBitQuantConfig
    from littlebit.hf.verification import unverified_loading, verify_config_file

    require_littlebit(path)
    with unverified_loading(allow_unverified):
        q = verify_config_file(path)["quantization_config"]
    if not isinstance(q.get("layers"), dict):
        raise LittleBitError(f"malformed quantization_config in {path}: layers must be an object")
    try:
        LittleBitQuantConfig(**q).specs()
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise LittleBitError(f"malformed quantization_config in {path}: {first_line(e)}") from e
    return q


def _expand(name: str, spec: dict) -> list[tuple[str, int, int, int]]:
    if spec.get("parts"):
        return [(f"{name}[{k}]", spec["in_features"], d_out, r) for k, d_out, r in spec["parts"]]
    return [(name, spec["in_features"], spec["out_features"], spec["rank"])]


def checkpoint_budget(path: Path, q: dict) -> tuple[ModelBudget, int, int]:
    """(bit report, bytes expected from the ranks, bytes on disk of the weight files)."""
    files = weight_files(path)  # the files a load reads: a stray copy beside them is not the model
    packed_prefixes = tuple(n + "." for n in q["layers"])
    other_numel, other_bytes, packed_on_disk = 0, 0, 0
    for file in files:
        entries, _ = read_header(file)
        size, end = file.stat().st_size, max((e.end for e in entries.values()), default=0)
        if size < end:
            raise LittleBitError(f"{file} is truncated: its header describes more data than it holds")
        if size > end:  # as a load refuses it
            raise LittleBitError(f"{file} was altered: it holds bytes past the data its header describes")
        for name, e in entries.items():
            if name.startswith(packed_prefixes):
                packed_on_disk += e.end - e.start
            else:
                other_numel += math.prod(e.shape)
                other_bytes += e.end - e.start
    target = (q.get("littlebit") or {}).get("bpw", 0.0)
    scale_bytes = torch.empty(0, dtype=scale_dtype_from_name(q.get("scale_dtype", "float16"))).element_size()
    layers, expected = [], other_bytes
    for name, spec in q["layers"].items():
        residual = spec.get("paths", 2) == 2
        for lname, d_in, d_out, r in _expand(name, spec):
            layers.append(LayerBudget(lname, d_in, d_out, r, residual, target))
            expected += packed_bytes(d_in, d_out, r, residual, scale_bytes)
            if spec.get("bias"):
                expected += d_out * scale_bytes
                other_numel += d_out  # biases stay 16-bit weights of the model
    if packed_on_disk != expected - other_bytes:  # as a load refuses tensors shaped unlike the config
        raise LittleBitError(
            f"{path}: the packed layers' tensors hold {packed_on_disk:,} bytes where the config's ranks "
            f"give {expected - other_bytes:,}: the config or the weights were altered"
        )
    converted = sum(layer.n_weights for layer in layers)
    budget = ModelBudget(layers, n_params=converted + other_numel, n_other_params=other_numel)
    on_disk = sum(f.stat().st_size for f in files)
    return budget, expected, on_disk


def memory_bytes(model: nn.Module) -> int:
    """Parameters plus buffers, each storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def checkpoint_info(
    path: str | Path, measure_memory: bool = True, device: str = "cpu", allow_unverified: bool = False
) -> dict:
    path = Path(path)
    q = read_quant_config(path, allow_unverified)
    budget, expected, on_disk = checkpoint_budget(path, q)
    info = budget.to_dict()
    info["layers"] = [
        {k: d[k] for k in ("name", "shape", "rank", "bpw", "bits", "bytes")} for d in info["layers"]
    ]
    info.update(bytes_on_disk=on_disk, bytes_expected=expected, format_version=q.get("format_version"))
    info["littlebit_config"] = q.get("littlebit")
    if measure_memory:
        from littlebit.hf.checkpoint import load_compressed

        model = load_compressed(path, device=device, allow_unverified=allow_unverified)
        info["bytes_in_memory"] = memory_bytes(model)
    info["fp16_bytes"] = SCALE_BITS // 8 * budget.n_params
    return info
