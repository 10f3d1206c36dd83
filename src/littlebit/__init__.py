"""littlebit: compress large language models below one bit per weight (LittleBit) and run them packed.

After ``import littlebit``, transformers' ``AutoModelForCausalLM.from_pretrained`` loads LittleBit
checkpoints (no remote code): the ``littlebit`` quantization method is registered with transformers
as soon as transformers' model code is imported, or at once if it already is. The names below are
imported on first use, so ``import littlebit`` (and ``littlebit --help``) stays instant.

    compress   convert(model, LittleBitConfig(bpw=0.55))
    recover    train(teacher, data, LittleBitConfig(bpw=1.0), TrainConfig(), work_dir, tokenizer)
    save/load  save_compressed(model, dir) / load_compressed(dir)
    run        prepare_for_decoding(model); group_projections(model); LatentKVCache.for_model(model)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LittleBitConfig": "littlebit.config",
    "LayerOverride": "littlebit.config",
    "LittleBitError": "littlebit.config",
    "LayerBudget": "littlebit.core.budget",
    "ModelBudget": "littlebit.core.budget",
    "layer_bpw": "littlebit.core.budget",
    "rank_for_bpw": "littlebit.core.budget",
    "budget": "littlebit.core.convert",
    "convert": "littlebit.core.convert",
    "LittleBitLinear": "littlebit.core.layer",
    "PackedLittleBitLinear": "littlebit.runtime.packed",
    "pack_model": "littlebit.runtime.packed",
    "prepare_for_decoding": "littlebit.runtime.packed",
    "group_projections": "littlebit.runtime.grouping",
    "LatentKVCache": "littlebit.runtime.kvcache",
    "load_compressed": "littlebit.hf.checkpoint",
    "save_compressed": "littlebit.hf.checkpoint",
    "train": "littlebit.training.trainer",
    "TrainConfig": "littlebit.training.trainer",
    "TrainResult": "littlebit.training.trainer",
    "BlockConfig": "littlebit.training.blockwise",
    "DistillConfig": "littlebit.training.distill",
    "LearningRates": "littlebit.training.optim",
}
__all__ = [
    "BlockConfig",
    "DistillConfig",
    "LatentKVCache",
    "LayerBudget",
    "LayerOverride",
    "LearningRates",
    "LittleBitConfig",
    "LittleBitError",
    "LittleBitLinear",
    "ModelBudget",
    "PackedLittleBitLinear",
    "TrainConfig",
    "TrainResult",
    "budget",
    "convert",
    "group_projections",
    "layer_bpw",
    "load_compressed",
    "pack_model",
    "prepare_for_decoding",
    "rank_for_bpw",
    "save_compressed",
    "train",
]

if TYPE_CHECKING:
    from littlebit.config import LayerOverride, LittleBitConfig, LittleBitError
    from littlebit.core.budget import LayerBudget, ModelBudget, layer_bpw, rank_for_bpw
    from littlebit.core.convert import budget, convert
    from littlebit.core.layer import LittleBitLinear
    from littlebit.hf.checkpoint import load_compressed, save_compressed
    from littlebit.runtime.grouping import group_projections
    from littlebit.runtime.kvcache import LatentKVCache
    from littlebit.runtime.packed import PackedLittleBitLinear, pack_model, prepare_for_decoding
    from littlebit.training.config import BlockConfig, DistillConfig, LearningRates, TrainConfig
    from littlebit.training.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'littlebit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# transformers' model code: once it has run, from_pretrained can be called, so the quantizer must be
# known by then. A finder on sys.meta_path waits for it instead of importing transformers (and torch)
# with littlebit, which would make every ``import littlebit`` and ``littlebit --help`` take seconds.
_TRANSFORMERS_MODELS = "transformers.modeling_utils"


def _register_quantizer() -> None:
    from littlebit.hf.quantizer import register_quantizer

    register_quantizer()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_register_quantizer`` right after ``transformers.modeling_utils`` has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_MODELS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_quantizer()

        spec.loader.exec_module = exec_module
        return spec


if _TRANSFORMERS_MODELS in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
