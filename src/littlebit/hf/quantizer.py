"""transformers integration: ``from_pretrained`` on a LittleBit directory returns the packed model.

Importing this module registers ``quant_method: "littlebit"`` with transformers' quantizer
registry, so no ``trust_remote_code`` is needed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
)
from transformers.quantizers.auto import register_quantizer as register_hf_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from littlebit.config import LittleBitError
from littlebit.hf.format import FORMAT_VERSION, cast_unquantized, scale_dtype_from_name
from littlebit.hf.verification import config_digest, state_digests, verify_config_file, verify_files
from littlebit.runtime.packed import LayerSpec, install_packed_skeleton

_SPEC_INTS = ("in_features", "out_features", "rank", "paths")


class LittleBitQuantConfig(QuantizationConfigMixin):
    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        layers: dict[str, dict] | None = None,
        littlebit: dict | None = None,
        scale_dtype: str = "float16",
        word_bits: int = 32,
        bit_order: str = "lsb-first",
        tensor_digests: dict[str, str] | None = None,
        config_digest: str | None = None,
        file_digests: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = "littlebit"
        self.format_version = format_version
        self.layers = layers or {}
        self.littlebit = littlebit
        self.scale_dtype = scale_dtype
        self.word_bits = word_bits
        self.bit_order = bit_order
        self.tensor_digests = tensor_digests
        self.config_digest = config_digest
        self.file_digests = file_digests
        if format_version != FORMAT_VERSION:
            raise LittleBitError(
                f"unsupported LittleBit format version {format_version!r} (this build reads {FORMAT_VERSION})"
            )
        if word_bits != 32 or bit_order != "lsb-first":
            raise LittleBitError(f"unsupported sign layout: {word_bits}-bit words, {bit_order}")
        scale_dtype_from_name(scale_dtype)
        if not isinstance(self.layers, dict):
            raise LittleBitError("quantization_config.layers must map module names to layer specs")

    def specs(self) -> dict[str, LayerSpec]:
        try:
            specs = {name: LayerSpec(**spec) for name, spec in self.layers.items()}
        except TypeError as e:
            raise LittleBitError(f"malformed layer spec in quantization_config: {e}") from e
        for name, spec in specs.items():
            _check_spec(name, spec)
        return specs

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return scale_dtype_from_name(self.scale_dtype)


def _check_spec(name: str, spec: LayerSpec) -> None:
    """Types and ranges a hand-edited or damaged config could get wrong (the shapes come from it)."""

    def positive_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    bad = [f for f in _SPEC_INTS if not positive_int(getattr(spec, f)) and not (f == "rank" and spec.parts)]
    if spec.paths not in (1, 2):
        bad.append("paths")
    if not isinstance(spec.bias, bool):
        bad.append("bias")
    parts_ok = isinstance(spec.parts, list) and all(
        isinstance(p, list)
        and len(p) == 3
        and isinstance(p[0], str)
        and positive_int(p[1])
        and positive_int(p[2])
        for p in spec.parts
    )
    if not parts_ok or (spec.parts and sum(p[1] for p in spec.parts) != spec.out_features):
        bad.append("parts")
    if bad:
        raise LittleBitError(f"malformed layer spec for {name} in quantization_config: {', '.join(bad)}")


def _expected_tensors(model) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """Shapes of every tensor the model loads, and for each name the others sharing its storage.

    Tied embeddings may not be tied yet on the skeleton (transformers ties after loading), so they
    are taken from the config as well as from tensors that are already one object.
    """
    state = model.state_dict()
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    groups: dict[int, set[str]] = {}
    for name, t in named.items():
        if name in state:
            groups.setdefault(id(t), set()).add(name)
    groups_list = list(groups.values())
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_config, "tie_word_embeddings", False):
        modules = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is not None and out is not None and id(out) in modules:
            groups_list.append({f"{modules[id(inp)]}.weight", f"{modules[id(out)]}.weight"} & set(state))
    tied: dict[str, set[str]] = {}
    for group in groups_list:
        for n in group:
            tied.setdefault(n, set()).update(group - {n})
    return {k: tuple(v.shape) for k, v in state.items()}, {k: sorted(v) for k, v in tied.items()}


class LittleBitHfQuantizer(HfQuantizer):
    requires_calibration = True  # LittleBit checkpoints are produced by littlebit, not at load time

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return

    def update_dtype(self, dtype):
        self._requested_dtype = dtype  # applied after loading: see get_new_dtype
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        specs = self.quantization_config.specs()
        for name, spec in specs.items():
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise LittleBitError(f"config names a layer the model does not have: {name}") from e
            shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
            if shape != (spec.in_features, spec.out_features):
                raise LittleBitError(
                    f"{name}: config says {spec.out_features}x{spec.in_features}, "
                    f"model has {shape[1]}x{shape[0]}"
                )
        install_packed_skeleton(model, specs, self.quantization_config.torch_scale_dtype)
        files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        if not files:
            raise LittleBitError("a LittleBit model loads from its safetensors files only")
        # a hub snapshot may fetch the tokenizer after the model: files not there yet are not refused
        raw = verify_config_file(Path(files[0]).parent, require_side_files=False)
        expected, tied = _expected_tensors(model)
        verify_files(files, raw["quantization_config"], expected, tied)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        left = [n for n, b in model.named_buffers() if b.device.type == "meta"]
        if left:
            raise LittleBitError(f"checkpoint did not provide {left[0]} (and {len(left) - 1} more)")
        dtype = getattr(self, "_requested_dtype", None)
        if isinstance(dtype, torch.dtype):
            cast_unquantized(model, dtype)
        return model

    def get_new_dtype(self, converter, param, dtype):
        # Tensors load as saved (the words are integers, the scales keep their precision); the
        # uncompressed weights are cast to the requested dtype after loading instead.
        return None

    def get_state_dict_and_metadata(self, model):
        """Record digests of every tensor and of config.json as they will be written. The files beside
        them are written by other calls (the tokenizer's own), so only ``save_compressed`` seals them:
        digests loaded with the model would describe the old files."""
        q = self.quantization_config
        q.file_digests = None
        q.tensor_digests = state_digests(model.state_dict())
        q.config_digest = config_digest(config_as_saved(model))
        return None, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def config_as_saved(model) -> dict:
    """The config.json that ``save_pretrained`` is about to write (it sets dtype and architectures
    after asking the quantizer for its metadata, so they are set here the same way)."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    return json.loads(config.to_json_string(use_diff=True))


def register_quantizer() -> None:
    """Make transformers read ``quant_method: "littlebit"`` (``import littlebit`` calls this)."""
    if "littlebit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("littlebit")(LittleBitQuantConfig)
    if "littlebit" not in AUTO_QUANTIZER_MAPPING:
        register_hf_quantizer("littlebit")(LittleBitHfQuantizer)
