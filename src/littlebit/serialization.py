"""The packed checkpoint: ``config.json`` with a ``quantization_config``, plus safetensors.

``quantization_config`` holds ``"quant_method": "littlebit"``, the format version, the bit layout,
every compressed module's shape (so the skeleton is built before reading weights), and digests of
every tensor and of ``config.json`` itself (``verification``), so a truncated or altered checkpoint is
refused instead of loaded as a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory
from .config import LittleBitConfig, LittleBitError, first_line
from .packed import PackedLittleBitLinear, layer_specs, pack_model
from .verification import unverified_loading

FORMAT_VERSION = 1
SCALE_NAMES = ("h", "l", "g")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Written into the safetensors header, so littlebit recognises its tensors even where config.json
# lost its quantization_config (transformers would then load a plain model with random layers).
FILE_MARKER = "littlebit_format"


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


def prepare_for_save(model: nn.Module, config: LittleBitConfig | None, scale_dtype: torch.dtype) -> None:
    """Attach the quantizer so ``save_pretrained`` writes (and ``from_pretrained`` reads) this format."""
    from .integration import LittleBitHfQuantizer, LittleBitQuantConfig

    qconfig = LittleBitQuantConfig.from_dict(quantization_config_dict(model, config, scale_dtype))
    model.config.quantization_config = qconfig
    model.hf_quantizer = LittleBitHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = "littlebit"


def save_compressed(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer=None,
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
    return Path(out_dir)


def read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LittleBitError(f"{path} is not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LittleBitError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise LittleBitError(f"{cfg_file} does not hold a JSON object")
    return cfg


def files_carry_marker(path: Path) -> bool:
    """Whether any safetensors file in ``path`` was written by littlebit (header metadata only)."""
    from safetensors import safe_open

    for file in path.glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                if FILE_MARKER in (f.metadata() or {}):
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
        if files_carry_marker(path):
            raise LittleBitError(
                f"{path} holds LittleBit tensors but its config.json has no littlebit quantization_config "
                "(damaged or edited)"
            )
        return "plain"
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "littlebit":
        raise LittleBitError(f"{path} is quantized with {method!r}, not littlebit: littlebit cannot load it")
    return "littlebit"


def load_compressed(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_unverified: bool = False,
):
    """Load a packed checkpoint through transformers (the skeleton is built on the meta device).

    Every tensor and ``config.json`` are checked against the digests saved with them; a checkpoint
    without digests loads only with ``allow_unverified=True``.
    """
    from transformers import AutoModelForCausalLM

    from . import integration  # noqa: F401  (registers the quantizer)

    path = Path(path)
    if checkpoint_kind(path) != "littlebit":
        raise LittleBitError(f"{path} is not a LittleBit checkpoint (no littlebit quantization_config)")
    try:
        with unverified_loading(allow_unverified):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=str(device))
    except LittleBitError:
        raise
    except Exception as e:
        raise LittleBitError(f"cannot load {path}: {first_line(e)}") from e
    return model.eval()
