"""Calibration statistics: the RMS of every decoder linear layer's input features on sample text.

They feed activation-aware initialisation (``init.initialise(input_scale=...)``): fitting
``W diag(s)`` instead of ``W`` weights each column by how strongly its input is driven, so the
factorisation spends its few bits on the error the layer's outputs actually see.
"""

from __future__ import annotations

import torch
from torch import nn

from littlebit.core.convert import decoder_linear_names


@torch.no_grad()
def input_rms(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{linear name: RMS of each input feature}`` over all tokens of ``sequences`` (n, seqlen)."""
    names = decoder_linear_names(model)
    sums: dict[str, torch.Tensor] = {}
    count = [0]

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = x.square().sum(0)
            sums[name] = sums[name] + acc if name in sums else acc

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for i in range(0, sequences.shape[0], batch_size):
            batch = sequences[i : i + batch_size].to(device)
            model(batch, use_cache=False)
            count[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count[0]).sqrt().cpu() for n, s in sums.items()}


def scale_function(rms: dict[str, torch.Tensor], power: float = 1.0):
    """``convert``'s ``input_scales`` callback: ``rms ** power``, normalised to mean 1 per layer.

    The normalisation only keeps the fitted scales near their usual magnitude; the fit itself is
    invariant to a constant factor.
    """

    def scales(name: str) -> torch.Tensor | None:
        if power == 0 or name not in rms:
            return None
        s = rms[name].clamp_min(1e-6) ** power
        return s / s.mean()

    return scales
