"""Grouped projections for decoding: layers that read the same input run as one call.

At batch 1 a small packed layer costs about its two kernel launches, not its bytes. The q/k/v
projections of an attention block, and gate/up of an MLP, read the same input, so one grouped call
(``ops.littlebit_linear`` with ``groups``) replaces three (or two) pairs of launches with one. Dense
``nn.Linear`` members are grouped too, into one concatenated weight, so an FP16 baseline gets the same
treatment (as gpt-fast's fused ``wqkv``).

The parent module (attention, MLP) keeps its own code. A forward pre-hook runs the grouped call on the
parent's input, and each member is replaced by a ``GroupMember`` that returns its slice. This relies
on the parent calling every member on its input unchanged, as Llama-style blocks do; a member called
on any other tensor raises. Group after loading and before compiling; the grouped model's state dict
has the grouped tensors, so save the ungrouped one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from littlebit.op import littlebit_linear
from littlebit.runtime.packed import PackedLittleBitLinear

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_PACKED = ("u_signs", "v_signs", "h", "l", "g")


def _key(m: nn.Module) -> tuple | None:
    """Members group when their keys are equal; None: not groupable."""
    if isinstance(m, PackedLittleBitLinear):
        has_bias = m.bias is not None
        shape = (m.in_features, m.out_features, m.rank, m.n_paths, has_bias)
        return ("packed", *shape, m.h.dtype, m.h.device, m.u_tiled)
    if type(m) is nn.Linear:
        return ("dense", m.in_features, m.bias is not None, m.weight.dtype, m.weight.device)
    return None


class GroupedProjection(nn.Module):
    """Several layers with one input, as one call; ``forward`` returns their outputs in order."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len({_key(m) for m in members}) != 1 or _key(members[0]) is None:
            raise ValueError("grouped layers must all be packed LittleBit layers of one shape, or nn.Linear")
        self.splits = [m.out_features for m in members]
        self.packed = isinstance(members[0], PackedLittleBitLinear)
        self.u_tiled = self.packed and members[0].u_tiled  # stacked per path: still tile order
        self.in_features = members[0].in_features
        with torch.no_grad():
            names = _PACKED if self.packed else ("weight",)
            for name in names:
                self.register_buffer(name, torch.cat([getattr(m, name) for m in members]))
            biases = [m.bias for m in members]
            self.register_buffer("bias", None if biases[0] is None else torch.cat(biases))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.packed:
            y = littlebit_linear(
                x,
                self.u_signs,
                self.v_signs,
                self.h,
                self.l,
                self.g,
                self.bias,
                groups=len(self.splits),
                u_tiled=self.u_tiled,
            )
        else:
            y = F.linear(x, self.weight, self.bias)
        return list(y.split(self.splits, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, outs={self.splits}, packed={self.packed}"


class GroupMember(nn.Module):
    """Stands in for a grouped layer: returns what the group computed for the parent's input."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.source:
            raise RuntimeError(
                "a grouped projection was called on another tensor than its parent's input; "
                "this model's blocks do not fit group_projections"
            )
        return self.output


def _run_groups(parent: nn.Module, args: tuple, kwargs: dict) -> None:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(x, torch.Tensor):
        raise RuntimeError(f"{type(parent).__name__} was called without its input first or as hidden_states=")
    for group_name, member_names in parent._littlebit_groups:
        outs = getattr(parent, group_name)(x)
        for name, out in zip(member_names, outs, strict=True):
            member = getattr(parent, name)
            member.source, member.output = x, out


def group_projections(model: nn.Module, groups: tuple[tuple[str, ...], ...] = DEFAULT_GROUPS) -> int:
    """Group the sibling layers named in ``groups`` wherever a module has two or more of one shape
    (e.g. k and v under grouped-query attention, where q is wider). Returns how many groups it made."""
    made = 0
    for parent in list(model.modules()):
        found = []
        for names in groups:
            by_key: dict[tuple, list[str]] = {}
            for name in names:
                key = _key(getattr(parent, name, None))
                if key is not None:
                    by_key.setdefault(key, []).append(name)
            found += [members for members in by_key.values() if len(members) > 1]
        if not found:
            continue
        specs = []
        for members in found:
            layers = [getattr(parent, n) for n in members]
            group_name = "grouped_" + "_".join(n.removesuffix("_proj") for n in members)
            parent.add_module(group_name, GroupedProjection(layers))
            for n, layer in zip(members, layers, strict=True):
                setattr(parent, n, GroupMember(layer.in_features, layer.out_features))
            specs.append((group_name, tuple(members)))
            made += 1
        if not hasattr(parent, "_littlebit_groups"):
            parent._littlebit_groups = []
            parent.register_forward_pre_hook(_run_groups, with_kwargs=True)
        parent._littlebit_groups += specs
    return made
