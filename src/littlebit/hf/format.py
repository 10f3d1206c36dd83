"""The packed checkpoint: ``config.json`` with a ``quantization_config``, plus safetensors.

``quantization_config`` holds ``"quant_method": "littlebit"``, the format version, the bit layout,
every compressed module's shape (so the skeleton is built before reading weights), and digests of
every tensor and of ``config.json`` itself (``verification``), so a truncated or altered checkpoint is
refused instead of loaded as a different model.
"""

from __future__ import annotations

import torch
from torch import nn

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.runtime.packed import PackedLittleBitLinear, layer_specs

FORMAT_VERSION = 1
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The name every packed layer's first sign matrix ends with: how littlebit recognises its tensors
# where config.json lost its quantization_config (transformers would load a plain, random model).
# (Not a safetensors metadata key: with two keys there, their order in the file varies between saves.)
PACKED_TENSOR_SUFFIX = ".u_signs"


def scale_dtype_from_name(name: object) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise LittleBitError(f"unsupported scale_dtype {name!r}; expected one of {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[name]


def quantization_config_dict(
    model: nn.Module, config: LittleBitConfig | None, scale_dtype: torch.dtype = torch.float16
) -> dict:
    return {
        "quant_method": "littlebit",
        "format_version": FORMAT_VERSION,
        "word_bits": 32,
        "bit_order": "lsb-first",
        "scale_dtype": str(scale_dtype).removeprefix("torch."),
        "littlebit": config.to_dict() if config is not None else None,
        "layers": {name: spec.to_dict() for name, spec in layer_specs(model).items()},
    }


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Everything outside the packed layers (embeddings, head, norms) in ``dtype``."""
    packed = {id(b) for m in model.modules() if isinstance(m, PackedLittleBitLinear) for b in m.buffers()}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in packed:
            p.data = p.data.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
