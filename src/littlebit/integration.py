"""transformers integration: ``from_pretrained`` on a LittleBit directory returns the packed model.

Importing this module registers ``quant_method: "littlebit"`` with transformers' quantizer
registry, so no ``trust_remote_code`` is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import LittleBitError
from .packed import LayerSpec, install_packed_skeleton
from .serialization import FORMAT_VERSION, cast_unquantized, state_digests, tie_groups, verify_files


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
        tied_tensors: list[list[str]] | None = None,
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
        self.tied_tensors = tied_tensors
        if format_version != FORMAT_VERSION:
            raise LittleBitError(
                f"unsupported LittleBit format version {format_version!r} (this build reads {FORMAT_VERSION})"
            )
        if word_bits != 32 or bit_order != "lsb-first":
            raise LittleBitError(f"unsupported sign layout: {word_bits}-bit words, {bit_order}")

    def specs(self) -> dict[str, LayerSpec]:
        try:
            return {name: LayerSpec(**spec) for name, spec in self.layers.items()}
        except TypeError as e:
            raise LittleBitError(f"malformed layer spec in quantization_config: {e}") from e

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)


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
        files = kwargs.get("checkpoint_files") or []
        if files:
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            verify_files(list(files), self.quantization_config.to_dict(), expected)
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
        """Record a digest of every tensor as it will be written, so loading can verify it."""
        state = model.state_dict()
        self.quantization_config.tensor_digests = state_digests(state)
        self.quantization_config.tied_tensors = tie_groups(state)
        return None, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    if "littlebit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("littlebit")(LittleBitQuantConfig)
    if "littlebit" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("littlebit")(LittleBitHfQuantizer)


register()
