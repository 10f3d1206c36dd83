"""The deployment form: packed sign words and 16-bit scales, built straight from a layer spec.

A spec (stored in ``config.json``) gives every compressed module's shape before a byte of weights
is read, so the model skeleton can be built on the meta device and loaded with ``assign=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from littlebit import kernels
from littlebit.core.convert import SplitLinear, set_submodule
from littlebit.core.layer import LittleBitLinear
from littlebit.core.packing import n_words, tile_order, untile_order
from littlebit.op import littlebit_linear

kernels.register()  # the fast backends behind littlebit_linear, for the devices this machine has


class PackedLittleBitLinear(nn.Module):
    """Inference layer: holds only packed words and scales, and never forms a d_out x d_in matrix."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        n_paths: int = 2,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        words = {"dtype": torch.int32, "device": device}
        scales = {"dtype": scale_dtype, "device": device}
        self.register_buffer("u_signs", torch.zeros(n_paths, out_features, n_words(rank), **words))
        self.register_buffer("v_signs", torch.zeros(n_paths, rank, n_words(in_features), **words))
        self.register_buffer("h", torch.ones(n_paths, out_features, **scales))
        self.register_buffer("l", torch.ones(n_paths, rank, **scales))
        self.register_buffer("g", torch.ones(n_paths, in_features, **scales))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, **scales))
        else:
            self.bias = None
        # u_signs holds its words in tile order (``tile_u_signs``); state dicts always get row order
        self.u_tiled = False

    @property
    def n_paths(self) -> int:
        return self.u_signs.shape[0]

    @classmethod
    def from_training(
        cls, layer: LittleBitLinear, scale_dtype: torch.dtype = torch.float16
    ) -> PackedLittleBitLinear:
        state = layer.packed_state(scale_dtype)
        packed = cls(
            layer.in_features,
            layer.out_features,
            layer.rank,
            layer.n_paths,
            layer.bias is not None,
            scale_dtype,
            device="meta",
        )
        for name, tensor in state.items():
            setattr(packed, name, tensor)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return littlebit_linear(
            x, self.u_signs, self.v_signs, self.h, self.l, self.g, self.bias, u_tiled=self.u_tiled
        )

    @torch.no_grad()
    def tile_u_signs(self, tiled: bool = True) -> None:
        """Rearrange ``u_signs`` in place into tile order (``packing.tile_order``: what the bit-serial
        GPU kernel reads fastest), or back to row order; same shape and memory."""
        if tiled != self.u_tiled:
            self.u_signs.copy_((tile_order if tiled else untile_order)(self.u_signs))
            self.u_tiled = tiled

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.u_tiled:
            destination[prefix + "u_signs"] = untile_order(self.u_signs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.u_tiled and prefix + "u_signs" in state_dict:  # row order came in
            with torch.no_grad():
                self.u_signs.copy_(tile_order(self.u_signs))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"paths={self.n_paths}, bias={self.bias is not None}"
        )


@dataclass
class LayerSpec:
    """Shape of one compressed module; ``parts``, for fused ones, lists ``[name, out_features, rank]``
    in output order (a list, because JSON writers may sort the keys of a mapping)."""

    in_features: int
    out_features: int
    rank: int = 0
    bias: bool = False
    paths: int = 2
    parts: list[list] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.parts:
            d.pop("parts")
        return d


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """Specs of every compressed module of a training-form or packed model."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, SplitLinear):
            first = next(iter(m.parts.values()))
            parts = [[k, p.out_features, p.rank] for k, p in m.parts.items()]
            bias = first.bias is not None
            specs[name] = LayerSpec(m.in_features, m.out_features, 0, bias, first.n_paths, parts)
        elif isinstance(m, (LittleBitLinear, PackedLittleBitLinear)) and ".parts." not in name:
            specs[name] = LayerSpec(m.in_features, m.out_features, m.rank, m.bias is not None, m.n_paths)
    return specs


def _packed_from_spec(spec: LayerSpec, scale_dtype: torch.dtype, device) -> nn.Module:
    if not spec.parts:
        return PackedLittleBitLinear(
            spec.in_features, spec.out_features, spec.rank, spec.paths, spec.bias, scale_dtype, device
        )
    parts = {
        k: PackedLittleBitLinear(spec.in_features, d_out, r, spec.paths, spec.bias, scale_dtype, device)
        for k, d_out, r in spec.parts
    }
    return SplitLinear(parts, spec.in_features)


def install_packed_skeleton(
    model: nn.Module,
    specs: dict[str, LayerSpec],
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "meta",
) -> None:
    """Swap the named modules for empty packed layers (on ``device``, meta by default)."""
    for name, spec in specs.items():
        set_submodule(model, name, _packed_from_spec(spec, scale_dtype, device))


def prepare_for_decoding(model: nn.Module) -> int:
    """Put the S_U words of every packed layer whose batch-1 calls take the bit-serial GPU kernel in
    tile order, in place (no extra memory; on the H100 8192x28672 at 1.0 BPW: 21.15 -> 19.29 µs a call).
    Calls of more tokens, and other backends, still work (they read a transient row-ordered copy, so
    prefill pays a little); state dicts stay in row order. Returns how many layers were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLittleBitLinear) and not m.u_tiled:
            if kernels.tile_order_pays(m.u_signs, m.h.dtype):
                m.tile_u_signs()
                n += 1
    return n


def pack_model(model: nn.Module, scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every training-form layer of ``model`` in place by its packed deployment form."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LittleBitLinear):
            set_submodule(model, name, PackedLittleBitLinear.from_training(m, scale_dtype))
    return model
