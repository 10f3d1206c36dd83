"""Baselines measured in the same harness on the same layers, so comparisons are honest.

- ``svd``: fp16 truncated SVD at the rank that spends the same bits as the LittleBit target.
- ``onebit``: ``sign(W)`` with rank-1 magnitude scales (OneBit-style), about 1 bit per weight.
"""

from __future__ import annotations

import torch
from torch import nn

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.budget import SCALE_BITS, LayerBudget, ModelBudget
from littlebit.core.convert import count_params, plan, set_submodule
from littlebit.core.init import rank1_magnitudes, truncated_svd

BASELINES = ("svd", "onebit")


class LowRankLinear(nn.Module):
    """``x @ (A B)^T`` with fp16-storable factors A (d_out x r) and B (r x d_in)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = b.shape[1], a.shape[0]
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.b.to(x.dtype).T) @ self.a.to(x.dtype).T
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class SignRank1Linear(nn.Module):
    """``W ~ sign(W) * (a b^T)``: one sign bit per weight plus two 16-bit scale vectors."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        a, b = rank1_magnitudes(w)
        self.signs = nn.Parameter(torch.where(w >= 0, 1.0, -1.0), requires_grad=False)
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        y = ((x * self.b.to(dt)) @ self.signs.to(dt).T) * self.a.to(dt)
        return y + self.bias.to(dt) if self.bias is not None else y


def svd_rank(d_in: int, d_out: int, bpw: float) -> int:
    return max(1, int(bpw * d_in * d_out // (SCALE_BITS * (d_in + d_out))))


def apply_baseline(model: nn.Module, kind: str, bpw: float = 1.0) -> ModelBudget:
    """Replace the layers LittleBit would compress by the baseline ``kind``; returns its bit report."""
    if kind not in BASELINES:
        raise LittleBitError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
    targets = plan(model, LittleBitConfig(bpw=bpw))
    n_params = count_params(model)
    layers: list[LayerBudget] = []
    for name in dict.fromkeys(t.module_name for t in targets):
        linear = model.get_submodule(name)
        w = linear.weight.detach().float()
        bias = linear.bias.detach().float() if linear.bias is not None else None
        d_out, d_in = w.shape
        if kind == "svd":
            r = min(svd_rank(d_in, d_out, bpw), d_in, d_out)
            u, s, v = truncated_svd(w, r, seed=0)
            root = s.sqrt()
            new = LowRankLinear(u * root, (v * root).T.contiguous(), bias)
            bits = SCALE_BITS * r * (d_in + d_out)
        else:
            new = SignRank1Linear(w, bias)
            bits = d_in * d_out + SCALE_BITS * (d_in + d_out)
        set_submodule(model, name, new.to(linear.weight.device))
        layers.append(_FixedBits(name, d_in, d_out, bits, bpw))
    converted = sum(layer.n_weights for layer in layers)
    return ModelBudget(layers, n_params=n_params, n_other_params=n_params - converted)


class _FixedBits(LayerBudget):
    """A layer whose cost is given directly (the baselines are not rank/scale structured)."""

    def __init__(self, name: str, d_in: int, d_out: int, bits: int, target: float) -> None:
        super().__init__(name, d_in, d_out, 0, False, target)
        self._bits = bits

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def bytes(self) -> int:
        return (self._bits + 7) // 8
