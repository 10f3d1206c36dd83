"""The packed checkpoint: ``config.json`` with a ``quantization_config``, plus safetensors.

``quantization_config`` holds ``"quant_method": "littlebit"``, the format version, the bit layout,
every compressed module's shape (so the skeleton is built before reading weights) and a digest of
every tensor, so a truncated or altered file is refused instead of loaded as garbage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import LittleBitConfig, LittleBitError
from .packed import PackedLittleBitLinear, layer_specs, pack_model

FORMAT_VERSION = 1
SCALE_NAMES = ("h", "l", "g")


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


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit patterns
        data = data.view(torch.int16)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def state_digests(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in sorted(state_dict.items())}


def verify_files(files: list[str], qconfig: dict, expected_shapes: dict[str, tuple] | None = None) -> None:
    """Refuse checkpoints whose tensors are missing, truncated, altered or shaped unlike the config."""
    from safetensors import safe_open

    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise LittleBitError(
            f"unsupported LittleBit format version {version!r} (this build reads {FORMAT_VERSION})"
        )
    digests = qconfig.get("tensor_digests") or {}
    seen = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    seen.add(name)
                    t = f.get_tensor(name)
                    if expected_shapes is not None and name in expected_shapes:
                        if tuple(t.shape) != tuple(expected_shapes[name]):
                            raise LittleBitError(
                                f"{name}: shape {tuple(t.shape)} in {Path(file).name} disagrees with the "
                                f"config ({tuple(expected_shapes[name])})"
                            )
                    if digests and digests.get(name) != tensor_digest(t):
                        raise LittleBitError(f"{name} in {Path(file).name} is damaged (checksum mismatch)")
        except LittleBitError:
            raise
        except Exception as e:
            raise LittleBitError(
                f"cannot read {file}: damaged or truncated ({str(e).splitlines()[0]})"
            ) from e
    missing = set(digests) - seen
    for group in qconfig.get("tied_tensors") or []:
        if seen & set(group):
            missing -= set(group)
    missing = sorted(missing)
    if missing:
        raise LittleBitError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")


def tie_groups(state_dict: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that share one storage (tied embeddings): a checkpoint holds only one of each group."""
    groups: dict[tuple, list[str]] = {}
    for name, t in sorted(state_dict.items()):
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


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


def atomic_directory(out_dir: str | Path):
    """A temporary sibling directory that is renamed to ``out_dir`` only once complete."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LittleBitError(f"output directory {out} exists and is not empty")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise LittleBitError(f"cannot write to {parent}: {e.strerror}") from e


def finish_directory(tmp: Path, out_dir: str | Path) -> None:
    out = Path(out_dir)
    if out.is_dir():
        out.rmdir()  # empty: checked by atomic_directory
    os.replace(tmp, out)


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
    tmp = atomic_directory(out_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a packed checkpoint through transformers (the skeleton is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import integration  # noqa: F401  (registers the quantizer)

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LittleBitError(f"{path} is not a model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise LittleBitError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from e
    q = getattr(cfg, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    if not q or q.get("quant_method") != "littlebit":
        raise LittleBitError(f"{path} is not a LittleBit checkpoint (no littlebit quantization_config)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=str(device))
    except LittleBitError:
        raise
    except Exception as e:
        raise LittleBitError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from e
    return model.eval()
