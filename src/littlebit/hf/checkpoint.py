"""Saving and loading LittleBit checkpoints (the format is in ``format``, its checks in ``verification``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from littlebit.atomic import atomic_directory
from littlebit.config import LittleBitConfig, LittleBitError, first_line
from littlebit.hf.format import PACKED_TENSOR_SUFFIX, cast_unquantized, quantization_config_dict
from littlebit.hf.quantizer import LittleBitHfQuantizer, LittleBitQuantConfig, register_quantizer
from littlebit.hf.verification import (
    read_config_json,
    seal_side_files,
    unverified_loading,
    verify_side_files,
)
from littlebit.runtime.packed import pack_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_for_save(model: nn.Module, config: LittleBitConfig | None, scale_dtype: torch.dtype) -> None:
    """Attach the quantizer so ``save_pretrained`` writes (and ``from_pretrained`` reads) this format."""
    qconfig = LittleBitQuantConfig.from_dict(quantization_config_dict(model, config, scale_dtype))
    model.config.quantization_config = qconfig
    model.hf_quantizer = LittleBitHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = "littlebit"


def save_compressed(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config: LittleBitConfig | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    scale_dtype: torch.dtype = torch.float16,
) -> Path:
    """Pack ``model`` (if still in training form) and write it to ``out_dir`` atomically.

    ``dtype`` is the precision of everything that is not compressed (embeddings, head, norms).
    """
    config = config or getattr(model, "littlebit_config", None)
    pack_model(model, scale_dtype)
    if dtype is not None:
        cast_unquantized(model, dtype)
    prepare_for_save(model, config, scale_dtype)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        seal_side_files(tmp)
    return Path(out_dir)


def holds_packed_tensors(path: Path) -> bool:
    """Whether a safetensors file in ``path`` holds packed sign words (read from the headers only)."""
    from safetensors import safe_open

    for file in path.glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                if any(name.endswith(PACKED_TENSOR_SUFFIX) for name in f.keys()):
                    return True
        except Exception:  # unreadable files are reported by whoever loads them
            continue
    return False


def checkpoint_kind(path: str | Path) -> str:
    """``"littlebit"`` for a LittleBit directory, ``"plain"`` for an unquantized model directory.

    Anything else is refused with a one-line error: another quantization method, or LittleBit
    tensors whose config lost its ``quantization_config``.
    """
    path = Path(path)
    cfg = read_config_json(path)
    q = cfg.get("quantization_config")
    if q is None:
        if holds_packed_tensors(path):
            raise LittleBitError(
                f"{path} holds LittleBit tensors but its config.json has no littlebit quantization_config "
                "(damaged or edited)"
            )
        return "plain"
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "littlebit":
        raise LittleBitError(f"{path} is quantized with {method!r}, not littlebit: littlebit cannot load it")
    return "littlebit"


def require_littlebit(path: str | Path) -> Path:
    """``path`` as a Path when it is a LittleBit directory; a one-line error otherwise."""
    if checkpoint_kind(path) != "littlebit":
        raise LittleBitError(f"{path} is not a LittleBit checkpoint (no littlebit quantization_config)")
    return Path(path)


def load_compressed(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_unverified: bool = False,
) -> PreTrainedModel:
    """Load a packed checkpoint through transformers (the skeleton is built on the meta device).

    Every tensor, ``config.json`` and the files saved beside them (tokenizer, generation defaults) are
    checked against the digests saved with them. ``allow_unverified=True`` loads a checkpoint without
    digests, and one whose tokenizer or generation files were edited since (with a warning); damaged
    tensors or config are refused regardless.
    """
    from transformers import AutoModelForCausalLM

    register_quantizer()

    path = require_littlebit(path)
    try:
        with unverified_loading(allow_unverified):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=str(device))
            # loading checked the files there; a local checkpoint must still have all it was saved with
            verify_side_files(path, read_config_json(path)["quantization_config"])
    except LittleBitError:
        raise
    except Exception as e:
        raise LittleBitError(f"cannot load {path}: {first_line(e)}") from e
    return model.eval()
