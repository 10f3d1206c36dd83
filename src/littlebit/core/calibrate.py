"""Calibration statistics of every decoder linear layer on sample text: the RMS of its input
features, and the RMS of the next-token loss's gradient at its output features.

They feed the weighted initialisation (``init.initialise(input_scale=..., output_scale=...)``):
fitting ``diag(o) W diag(s)`` instead of ``W`` weights each column by how strongly its input is
driven and each row by how much its output moves the loss (a diagonal estimate of the loss's
curvature, as in Fisher-weighted quantisation), so the factorisation spends its few bits on the
error the model's predictions actually see.
"""

from __future__ import annotations

from collections.abc import Callable

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


def linear_input_squares(model: nn.Module) -> InputSquares:
    """A recorder of the inputs of every decoder linear layer of ``model``."""
    return InputSquares({n: model.get_submodule(n) for n in decoder_linear_names(model)})


@torch.no_grad()
def input_rms(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{linear name: RMS of each input feature}`` over all tokens of ``sequences`` (n, seqlen)."""
    device = next(model.parameters()).device
    count = 0
    with linear_input_squares(model) as squares:
        for i in range(0, sequences.shape[0], batch_size):
            batch = sequences[i : i + batch_size].to(device)
            model(batch, use_cache=False)
            count += batch.numel()
    return squares.rms(count)


def scale_function(rms: dict[str, torch.Tensor], power: float = 1.0) -> Callable[[str], torch.Tensor | None]:
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


def output_grad_rms(
    model: nn.Module, sequences: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """``{linear name: RMS of the next-token loss's gradient at each output feature}`` over all tokens
    of ``sequences`` (n, seqlen). The loss is summed over the predicted tokens, not averaged, so
    the values do not shrink with the batch (mean-loss gradients of the default model reach 1e-9).

    The gradient flows from the embeddings' output, made a leaf that requires it, and is taken with
    respect to it alone: no parameter's ``.grad`` is touched, whatever its ``requires_grad``.
    """
    names = decoder_linear_names(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}

    def track(name: str):
        def on_output(module, args, out):
            def on_grad(grad):
                acc = grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(0)
                sums[name] = sums[name] + acc if name in sums else acc

            out.register_hook(on_grad)

        return on_output

    leaves: list[torch.Tensor] = []

    def leaf(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    handles = [model.get_submodule(n).register_forward_hook(track(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    count = 0
    try:
        with torch.enable_grad():
            for i in range(0, sequences.shape[0], batch_size):
                batch = sequences[i : i + batch_size].to(device)
                loss = model(batch, labels=batch, use_cache=False).loss * (batch.numel() - batch.shape[0])
                torch.autograd.grad(loss, leaves.pop())
                count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count).sqrt().float().cpu() for n, s in sums.items()}
