"""Model conversion: which linear layers are compressed, at what rank, and the swap itself."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.budget import LayerBudget, ModelBudget, max_useful_rank, rank_for_bpw
from littlebit.core.layer import LittleBitLinear

log = logging.getLogger(__name__)

_KV_PART = re.compile(r"(^|[._\[])(k|v|k_proj|v_proj|key|value)(\]|$)")
# A module inside the attention block: a parent named like self_attn, attn, attention, self_attention.
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*\.")


@dataclass
class Target:
    """One compressed linear map. A fused projection yields several targets, one per ``part``."""

    module_name: str
    part: str | None
    d_in: int
    d_out: int
    rank: int
    target_bpw: float

    @property
    def name(self) -> str:
        return f"{self.module_name}[{self.part}]" if self.part else self.module_name


class SplitLinear(nn.Module):
    """A fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) as separately compressed parts.

    Each part gets its own rank, so k and v are budgeted like unfused k_proj and v_proj.
    """

    def __init__(self, parts: dict[str, nn.Module], in_features: int) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.in_features = in_features
        self.out_features = sum(p.out_features for p in parts.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts.values()], dim=-1)


def decoder_layer_classes(model: nn.Module) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or [])


def decoder_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the decoder's layers, in model order."""
    classes = decoder_layer_classes(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in classes]
    if not blocks:  # unknown architecture: fall back to the largest ModuleList of blocks
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        if lists:
            name, mlist = max(lists, key=lambda nm: len(nm[1]))
            blocks = [f"{name}.{i}" for i in range(len(mlist))]
    return blocks


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` inside the decoder's layers (not the head or embeddings)."""
    prefixes = tuple(b + "." for b in decoder_block_names(model))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(prefixes) and m is not head
    ]


def fused_split(model: nn.Module, name: str, linear: nn.Linear) -> dict[str, int] | None:
    """Output sizes of the parts of a fused projection, or None for an ordinary layer."""
    leaf = name.rsplit(".", 1)[-1]
    cfg = getattr(model, "config", None)
    if leaf == "qkv_proj" and cfg is not None:
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        sizes = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    elif leaf == "gate_up_proj":
        sizes = {"gate": linear.out_features // 2, "up": linear.out_features // 2}
    else:
        return None
    if sum(sizes.values()) != linear.out_features:
        raise LittleBitError(f"{name}: cannot split fused projection of {linear.out_features} outputs")
    return sizes


def is_kv(name: str) -> bool:
    return bool(_KV_PART.search(name.rsplit(".", 1)[-1]))


def is_attention(name: str) -> bool:
    """A projection of the attention block (``layers.0.self_attn.q_proj``, ``h.0.attention.wqkv``)."""
    return bool(_ATTENTION.search(name))


def plan(model: nn.Module, config: LittleBitConfig) -> list[Target]:
    """The compressed layers and their ranks, without touching any weight."""
    targets = []
    for name in decoder_linear_names(model):
        if config.is_skipped(name):
            continue
        linear = model.get_submodule(name)
        sizes = fused_split(model, name, linear) or {None: linear.out_features}
        for part, d_out in sizes.items():
            targets.append(Target(name, part, linear.in_features, d_out, 0, config.bpw))
    if not targets:
        raise LittleBitError(f"{type(model).__name__} has no linear layers to convert inside its decoder")
    _split_bits(targets, config)
    return [_with_rank(t, config) for t in targets]


def _split_bits(targets: list[Target], config: LittleBitConfig) -> None:
    """``attention_bpw_factor``: the attention projections' target at that multiple of ``bpw``, the
    other layers' at (1 - s * factor) / (1 - s) of it, s the attention's share of the weights, so
    the targets' mean over all weights stays ``bpw`` (each rank is then floored to its own target).
    A layer whose target asks for more than its full rank gets its full rank, and the bits it cannot
    use are not moved to the others: on the default model at 1.0 BPW, k and v reach rank 192 at factor
    1.5, and factor 2 spends 0.957 BPW."""
    factor = config.attention_bpw_factor
    weights = [t.d_in * t.d_out for t in targets]
    attention = sum(w for t, w in zip(targets, weights, strict=True) if is_attention(t.name))
    share = attention / sum(weights)
    if factor == 1.0 or share in (0.0, 1.0):
        return  # one kind of layer: nothing to move bits between
    rest = (1 - share * factor) / (1 - share)
    if rest <= 0:
        raise LittleBitError(
            f"attention_bpw_factor {factor:g} leaves no bits for the other layers: the attention "
            f"projections hold {share:.0%} of the weights, so the factor must be below {1 / share:.3g}"
        )
    for t in targets:
        t.target_bpw = config.bpw * (factor if is_attention(t.name) else rest)


def _with_rank(t: Target, config: LittleBitConfig) -> Target:
    override = config.override_for(t.name) or config.override_for(t.module_name)
    if override is not None and override.bpw is not None:
        t.target_bpw = override.bpw
    args = (t.d_in, t.d_out)
    kw = {"multiple": config.rank_multiple, "min_rank": config.min_rank}
    if override is not None and override.rank is not None:
        t.rank = override.rank
    else:
        t.rank = rank_for_bpw(*args, t.target_bpw, config.residual, **kw)
        if is_kv(t.name) and config.kv_rank_multiplier != 1.0:
            # capped like any rank (a huge multiplier would not even fit an int)
            useful = max_useful_rank(t.d_in, t.d_out, config.rank_multiple)
            scaled = int(min(t.rank * config.kv_rank_multiplier, useful))
            t.rank = max(config.min_rank, scaled // config.rank_multiple * config.rank_multiple)
    return t


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def budget(model: nn.Module, config: LittleBitConfig, targets: list[Target] | None = None) -> ModelBudget:
    """Per-layer and whole-model bit report for ``model`` (uncompressed) under ``config``."""
    targets = targets if targets is not None else plan(model, config)
    layers = [LayerBudget(t.name, t.d_in, t.d_out, t.rank, config.residual, t.target_bpw) for t in targets]
    n_params = count_params(model)
    converted = sum(t.d_in * t.d_out for t in targets)
    return ModelBudget(layers, n_params=n_params, n_other_params=n_params - converted)


FeatureScales = Callable[[str], torch.Tensor | None]  # module name -> per-feature scale


def checked_plan(model: nn.Module, config: LittleBitConfig) -> tuple[list[Target], ModelBudget]:
    """The layers to convert and their bit report, warning about layers that cannot meet their target."""
    targets = plan(model, config)
    report = budget(model, config, targets)
    if (msg := report.warning()) is not None:
        log.warning(msg)
    return targets, report


def default_compute_device(compute_device: torch.device | str | None) -> torch.device | str | None:
    """Where initialisation runs: the device asked for, else the GPU when there is one."""
    if compute_device is None and torch.cuda.is_available():
        return "cuda"
    return compute_device


def convert(
    model: nn.Module,
    config: LittleBitConfig,
    compute_device: torch.device | str | None = None,
    input_scales: FeatureScales | None = None,
    progress: bool = True,
    output_scales: FeatureScales | None = None,
) -> ModelBudget:
    """Replace the decoder's linear layers of ``model`` in place with initialised LittleBit layers.

    ``input_scales(module_name)`` may return a per-input-feature scale for activation-aware
    initialisation, ``output_scales(module_name)`` a per-output-feature one (the whole module's, fused
    parts included). Returns the bit report; warns about layers that cannot meet their target.
    """
    targets, report = checked_plan(model, config)
    compute_device = default_compute_device(compute_device)
    by_module = targets_by_module(targets)
    for i, (name, parts) in enumerate(tqdm(by_module.items(), desc="LittleBit init", disable=not progress)):
        scale = input_scales(name) if input_scales is not None else None
        out_scale = output_scales(name) if output_scales is not None else None
        convert_module(model, name, parts, config, i, compute_device, scale, out_scale)
    attach_config(model, config)
    return report


def targets_by_module(targets: list[Target]) -> dict[str, list[Target]]:
    """The targets grouped by module, in model order: a module's index here seeds its initialisation."""
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.module_name, []).append(t)
    return by_module


def convert_module(
    model: nn.Module,
    name: str,
    parts: list[Target],
    config: LittleBitConfig,
    index: int,
    compute_device: torch.device | str | None = None,
    input_scale: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
) -> None:
    """Replace the linear ``name`` by its initialised LittleBit form; ``index`` is its position in
    ``targets_by_module`` (the seed offset), so one module converted alone matches a whole-model run."""
    linear = model.get_submodule(name)
    new = {}
    offset = 0
    for t in parts:
        sub = _slice_linear(linear, offset, t.d_out)
        offset += t.d_out
        new[t.part] = LittleBitLinear.from_linear(
            sub,
            t.rank,
            residual=config.residual,
            init=config.init,
            seed=config.seed + index,
            sign_function=config.sign_function,
            smooth_alpha=config.smooth_alpha,
            input_scale=input_scale,
            compute_device=compute_device,
            output_scale=None if output_scale is None else output_scale[offset - t.d_out : offset],
        )
    module = new[None] if None in new else SplitLinear(new, linear.in_features)
    set_submodule(model, name, module)


def _slice_linear(linear: nn.Linear, start: int, size: int) -> nn.Linear:
    if start == 0 and size == linear.out_features:
        return linear
    part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[start : start + size], requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[start : start + size], requires_grad=False)
    return part


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def attach_config(model: nn.Module, config: LittleBitConfig) -> None:
    model.littlebit_config = config
