"""littlebit: compress large language models below one bit per weight (LittleBit) and run them packed.

Importing the package registers the ``littlebit`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads LittleBit checkpoints without remote code.
"""

from . import integration as _integration  # noqa: F401  (registers the transformers quantizer)
from .budget import LayerBudget, ModelBudget, layer_bpw, rank_for_bpw
from .config import LayerOverride, LittleBitConfig, LittleBitError
from .convert import budget, convert
from .grouping import group_projections
from .layer import LittleBitLinear
from .packed import PackedLittleBitLinear, pack_model, prepare_for_decoding
from .serialization import load_compressed, save_compressed

__version__ = "0.1.0"

__all__ = [
    "LayerBudget",
    "LayerOverride",
    "LittleBitConfig",
    "LittleBitError",
    "LittleBitLinear",
    "ModelBudget",
    "PackedLittleBitLinear",
    "budget",
    "convert",
    "group_projections",
    "prepare_for_decoding",
    "layer_bpw",
    "load_compressed",
    "pack_model",
    "rank_for_bpw",
    "save_compressed",
]
