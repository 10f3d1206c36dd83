"""Write a Llama-shaped bf16 safetensors checkpoint with a realistic weight spectrum, a layer at a time.

Trained weight matrices are not white noise: a few hundred directions carry much of their energy and
the rest decays slowly. Each decoder matrix here is ``U diag(s) V^T + noise`` with random orthonormal-ish
``U``, ``V`` (Gaussian, scaled), singular values ``s_i ~ (i+1)^-decay`` over ``signal_rank`` directions,
and white noise holding ``1 - signal_share`` of the energy, scaled to the std of Llama-2's weights
(about 0.02). Truncated SVDs and rank choices therefore behave as on real models, where on white noise
every direction is equally (un)important.

One shard per decoder layer, written and freed before the next is made: memory stays about one layer.

    python benchmarks/synthetic_checkpoint.py --shape llama2-7b --out /tmp/llama7b
    python benchmarks/synthetic_checkpoint.py --shape llama2-70b --layers 4 --device cuda --out /tmp/l70
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
SHAPES = {
    name: dict(zip(_FIELDS, dims, strict=True), vocab_size=vocab)
    for name, dims, vocab in [
        ("llama2-7b", (4096, 11008, 32, 32, 32), 32000),
        ("llama2-13b", (5120, 13824, 40, 40, 40), 32000),
        ("llama2-70b", (8192, 28672, 80, 64, 8), 32000),
        ("tiny", (64, 160, 2, 4, 2), 256),
    ]
}
WEIGHT_STD = 0.02


def spectral_matrix(
    d_out: int,
    d_in: int,
    generator: torch.Generator,
    device: str = "cpu",
    signal_rank: int = 256,
    decay: float = 0.5,
    signal_share: float = 0.5,
    std: float = WEIGHT_STD,
) -> torch.Tensor:
    """A ``d_out x d_in`` float32 matrix: a decaying low-rank part plus white noise, of total std ``std``."""
    k = min(signal_rank, d_out, d_in)
    s = torch.arange(1, k + 1, dtype=torch.float32, device=device).pow(-decay)
    # Gaussian columns scaled by 1/sqrt(d) are nearly orthonormal: the product's spectrum is about s
    u = torch.randn(d_out, k, generator=generator, device=device) / d_out**0.5
    v = torch.randn(d_in, k, generator=generator, device=device) / d_in**0.5
    low = (u * s) @ v.T
    low *= (signal_share * d_out * d_in) ** 0.5 / s.norm()  # its energy: signal_share of the total
    w = torch.randn(d_out, d_in, generator=generator, device=device)
    w *= (1 - signal_share) ** 0.5
    w += low
    w *= std
    return w


def llama_config(shape: str, layers: int | None = None) -> dict:
    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    return dims


def _layer(dims: dict, i: int, generator, device: str, **spectrum) -> dict[str, torch.Tensor]:
    h, m = dims["hidden_size"], dims["intermediate_size"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (m, h),
        "mlp.up_proj": (m, h),
        "mlp.down_proj": (h, m),
    }
    p = f"model.layers.{i}."
    out = {
        p + name + ".weight": spectral_matrix(*shape, generator, device, **spectrum).to(torch.bfloat16).cpu()
        for name, shape in shapes.items()
    }
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[p + norm + ".weight"] = (
            (1 + 0.1 * torch.randn(h, generator=generator, device=device)).bfloat16().cpu()
        )
    return out


def write_checkpoint(
    out: str | Path,
    shape: str = "llama2-7b",
    layers: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    **spectrum,
) -> Path:
    """Write the checkpoint to ``out`` (a directory not there yet); returns it. ``layers`` cuts the depth."""
    from transformers import LlamaConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    dims = llama_config(shape, layers)
    n = dims["num_hidden_layers"]
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n + 1):
        name = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        if i < n:
            tensors = _layer(dims, i, generator, device, **spectrum)
        else:
            v, h = dims["vocab_size"], dims["hidden_size"]
            tensors = {
                "model.embed_tokens.weight": (
                    torch.randn(v, h, generator=generator, device=device) * WEIGHT_STD
                ),
                "lm_head.weight": torch.randn(v, h, generator=generator, device=device) * WEIGHT_STD,
                "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=generator, device=device),
            }
            tensors = {k: t.bfloat16().cpu() for k, t in tensors.items()}
        save_file(tensors, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--layers", type=int, help="decoder layers to write (default: the shape's own)")
    p.add_argument("--out", required=True, help="a directory that does not exist yet")
    p.add_argument("--device", default="cpu", help="where to draw the matrices (cuda is much faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signal-rank", type=int, default=256, help="directions of the low-rank part")
    p.add_argument("--decay", type=float, default=0.5, help="singular values of the low-rank part ~ i^-decay")
    p.add_argument("--signal-share", type=float, default=0.5, help="energy share of the low-rank part")
    a = p.parse_args()
    t0 = time.perf_counter()
    spectrum = dict(signal_rank=a.signal_rank, decay=a.decay, signal_share=a.signal_share)
    path = write_checkpoint(a.out, a.shape, a.layers, a.device, a.seed, **spectrum)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
