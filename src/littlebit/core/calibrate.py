"""Calibration statistics: the RMS of every decoder linear layer's input features on sample text.

They feed activation-aware initialisation (``init.initialise(input_scale=...)``): fitting
``W diag(s)`` instead of ``W`` weights each column by how strongly its input is driven, so the
factorisation spends its few bits on the error the layer's outputs actually see.
"""

from __future__ import annotations

import torch
from torch import nn

from littlebit.core.convert import decoder_linear_names


class InputSquares:
    """Per-feature sums of squares of the inputs of ``modules`` ({key: module}) over every forward
    while the recorder is active (``with``); ``rms(tokens)`` turns them into RMS values."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = x.square().sum(0)
            self.sums[name] = self.sums[name] + acc if name in self.sums else acc

        return fn

    def __enter__(self) -> InputSquares:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def rms(self, tokens: int) -> dict[str, torch.Tensor]:
        return {n: (s / tokens).sqrt().cpu() for n, s in self.sums.items()}


@torch.no_grad()
def input_rms(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{linear name: RMS of each input feature}`` over all tokens of ``sequences`` (n, seqlen)."""
    modules = {n: model.get_submodule(n) for n in decoder_linear_names(model)}
    device = next(model.parameters()).device
    count = 0
    with InputSquares(modules) as squares:
        for i in range(0, sequences.shape[0], batch_size):
            batch = sequences[i : i + batch_size].to(device)
            model(batch, use_cache=False)
            count += batch.numel()
    return squares.rms(count)


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
