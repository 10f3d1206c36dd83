"""Large packed models with random weights, built directly in packed form (for benchmarks).

The FP16 model is never materialised: the skeleton is built on the meta device, the decoder's
linear layers are swapped for packed layers, and only then is memory allocated on the target device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from littlebit.config import LittleBitConfig
from littlebit.core.budget import rank_for_bpw
from littlebit.runtime.packed import LayerSpec, install_packed_skeleton

if TYPE_CHECKING:
    from transformers import LlamaConfig

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "llama-2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


def llama_config(shape: str = "llama-2-7b", **overrides: Any) -> LlamaConfig:
    from transformers import LlamaConfig

    kw = dict(vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, **SHAPES[shape])
    kw.update(overrides)
    return LlamaConfig(**kw)


def _fill_random(model: nn.Module, generator: torch.Generator) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if t.dtype == torch.int32:
                t.copy_(torch.randint(-(2**31), 2**31 - 1, t.shape, generator=generator, dtype=torch.int32))
            elif leaf in ("h", "g"):
                t.copy_(torch.rand(t.shape, generator=generator) * 0.5 + 0.75)
            elif leaf == "l":  # keeps activations O(1): each latent sums d_in signed terms
                t.copy_(torch.full(t.shape, 1.0 / t.shape[-1] ** 0.5) / 8)
            elif "norm" in name:
                t.fill_(1.0)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=generator) * 0.02)


def random_dense_llama(
    shape: str = "llama-2-7b",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    **config_overrides: Any,
) -> nn.Module:
    """The dense Llama-shaped model that ``random_packed_llama`` compresses, with random weights
    (N(0, 0.02), norms at 1), built on the meta device and allocated once on ``device``."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, **config_overrides)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.eval()


def random_packed_llama(
    shape: str = "llama-2-7b",
    bpw: float = 0.1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    residual: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> nn.Module:
    """A Llama-shaped causal LM whose decoder linears are packed LittleBit layers with random bits."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, **config_overrides)
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in name:
            rank = rank_for_bpw(m.in_features, m.out_features, bpw, residual)
            specs[name] = LayerSpec(
                m.in_features, m.out_features, rank, m.bias is not None, 2 if residual else 1
            )
    install_packed_skeleton(model, specs, torch.float16, device="meta")
    model = model.to_empty(device=device)
    cpu_gen = torch.Generator().manual_seed(seed)
    # Random values are drawn on the CPU one tensor at a time, so only one layer is ever staged there.
    _fill_random(model, cpu_gen)
    # Rotary frequencies are a non-persistent buffer: rebuild it, as to_empty left it uninitialised.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.littlebit_config = LittleBitConfig(bpw=bpw, residual=residual)
    return model.eval()
