"""What trains and how fast: parameter groups, AdamW, and the warm-up + cosine schedule.

Trained: each LittleBit layer's latent factors (u, v), its scales (h, l, g) and bias, and, by
default, the RMSNorm weights. Embeddings and the LM head stay frozen (the paper keeps them in full
precision, and with tied embeddings training them would change the teacher's vocabulary space).
Norms train because they are cheap (a few thousand numbers) and the final norm, which scales the
logits, has no LittleBit scale after it to absorb a change in the residual stream's size.

Latents and scales get different learning rates: a latent matters only through its sign, so its
step size decides how many signs flip, while a scale is a real-valued gain. Each scale tensor's
rate is relative to its size (``lr * RMS``): activation-aware initialisation gives column scales
that differ by orders of magnitude between layers, and one absolute rate would freeze some while
shaking others. (Rates are set per half-octave of RMS, not per tensor; see ``param_groups``.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from littlebit.core.layer import LittleBitLinear
from littlebit.training.config import LearningRates

LATENT, SCALE, NORM = "latent", "scale", "norm"


def littlebit_modules(model: nn.Module) -> list[tuple[str, LittleBitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LittleBitLinear)]


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """1-D weights of normalisation layers (any module whose class name contains "Norm")."""
    out = []
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for pname, p in module.named_parameters(recurse=False):
                out.append((f"{name}.{pname}" if name else pname, p))
    return out


def select_trainable(model: nn.Module, train_norms: bool = True) -> dict[str, list[nn.Parameter]]:
    """Freeze everything, then unfreeze the LittleBit layers' parameters (and the norms)."""
    for p in model.parameters():
        p.requires_grad_(False)
    kinds: dict[str, list[nn.Parameter]] = {LATENT: [], SCALE: [], NORM: []}
    for _, m in littlebit_modules(model):
        kinds[LATENT] += [m.u, m.v]
        kinds[SCALE] += [m.h, m.l, m.g] + ([m.bias] if m.bias is not None else [])
    if train_norms:
        kinds[NORM] += [p for _, p in norm_parameters(model)]
    for params in kinds.values():
        for p in params:
            p.requires_grad_(True)
    return kinds


def _rms(p: torch.Tensor) -> float:
    return max(p.detach().float().square().mean().sqrt().item(), 1e-8)


def param_groups(kinds: dict[str, list[nn.Parameter]], lrs: LearningRates) -> list[dict]:
    groups = []
    if kinds[LATENT]:
        groups.append({"params": kinds[LATENT], "lr": lrs.latent, "base_lr": lrs.latent, "kind": LATENT})
    for kind, rate in ((SCALE, lrs.scale), (NORM, lrs.norm)):
        if not kinds[kind]:
            continue
        if not lrs.relative:
            groups.append({"params": kinds[kind], "lr": rate, "base_lr": rate, "kind": kind})
            continue
        # Tensors of similar size share a group (half-octave buckets): one group per tensor would
        # mean hundreds of optimizer launches per step, which dominated a step's time on an H100.
        # The buckets are fixed when the optimizer is made: training moves RMS values across bucket
        # edges, so a resumed run restores the saved groups (train_state) instead of calling this.
        buckets: dict[int, list[nn.Parameter]] = {}
        for p in kinds[kind]:
            buckets.setdefault(round(2 * math.log2(_rms(p))), []).append(p)
        for b in sorted(buckets):
            lr = rate * 2 ** (b / 2)
            groups.append({"params": buckets[b], "lr": lr, "base_lr": lr, "kind": kind})
    return groups


def make_optimizer(groups: list[dict], weight_decay: float = 0.0) -> torch.optim.AdamW:
    device = groups[0]["params"][0].device
    # fused AdamW runs one kernel per group on CUDA; the many small groups make that matter.
    kw = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-12, weight_decay=weight_decay, **kw)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's base rate by ``factor``."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
