"""The training form of a LittleBit layer: latent factors whose signs are used in the forward pass."""

from __future__ import annotations

import torch
from torch import nn

from littlebit.core.init import Factors, initialise
from littlebit.core.packing import pack_signs


class SmoothSign(torch.autograd.Function):
    """Forward ``sign`` (sign(0) = +1); backward ``alpha * (1 - tanh^2(alpha x))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        t = torch.tanh(ctx.alpha * x)
        return grad * ctx.alpha * (1 - t * t), None


class STESign(torch.autograd.Function):
    """Forward ``sign``; backward passes the gradient where ``|x| <= 1`` (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class LittleBitLinear(nn.Linear):
    """``nn.Linear`` replaced by binary latent factors and three scale vectors per path.

    The dense ``weight`` is never held (it is ``None``); the forward pass runs the factored product
    ``h * (S_U (l * (S_V^T (g * x))))`` for each path and sums them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        residual: bool = True,
        sign_function: str = "smooth",
        smooth_alpha: float = 100.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.residual, self.sign_function, self.smooth_alpha = residual, sign_function, smooth_alpha
        kw = {"device": device, "dtype": dtype or torch.float32}
        p = 2 if residual else 1
        self.register_parameter("weight", None)
        self.u = nn.Parameter(torch.zeros(p, out_features, rank, **kw))
        self.v = nn.Parameter(torch.zeros(p, in_features, rank, **kw))
        self.h = nn.Parameter(torch.ones(p, out_features, **kw))
        self.l = nn.Parameter(torch.ones(p, rank, **kw))
        self.g = nn.Parameter(torch.ones(p, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def n_paths(self) -> int:
        return self.u.shape[0]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        residual: bool = True,
        init: str = "dual-svid",
        seed: int = 0,
        sign_function: str = "smooth",
        smooth_alpha: float = 100.0,
        input_scale: torch.Tensor | None = None,
        compute_device: torch.device | str | None = None,
        output_scale: torch.Tensor | None = None,
    ) -> LittleBitLinear:
        w = linear.weight.detach()
        dev = torch.device(compute_device) if compute_device is not None else w.device
        factors = initialise(w.to(dev), rank, residual, init, seed, input_scale, output_scale=output_scale)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            residual=residual,
            sign_function=sign_function,
            smooth_alpha=smooth_alpha,
            device=w.device,
        )
        layer.load_factors(factors)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def load_factors(self, f: Factors) -> None:
        for name in ("u", "v", "h", "l", "g"):
            getattr(self, name).data.copy_(getattr(f, name))

    def factors(self) -> Factors:
        return Factors(*(getattr(self, n).detach() for n in ("u", "v", "h", "l", "g")))

    def signs(self, latent: torch.Tensor) -> torch.Tensor:
        """``sign(latent)`` with the configured surrogate gradient.

        Written as ``hard + (soft - soft.detach())`` rather than through the autograd Functions
        above: the value is exactly the sign and the gradient is the soft function's, and
        ``torch.compile`` fuses it with the scale folding instead of breaking the graph.
        """
        hard = torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
        if not (torch.is_grad_enabled() and latent.requires_grad):
            return hard
        if self.sign_function == "ste":
            soft = latent.clamp(-1.0, 1.0)
        else:
            soft = torch.tanh(latent * self.smooth_alpha)
        return hard + (soft - soft.detach())

    def folded_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (d_in, P*r) and ``B`` (d_out, P*r) with ``W = B A^T``: the scales folded into the signs.

        Folding costs O((d_in + d_out) r) per call instead of O(tokens * (d_in + d_out)) of
        element-wise work on activations, and turns both paths into two plain GEMMs.
        """
        p, r = self.n_paths, self.rank
        a = self.signs(self.v) * self.g[:, :, None] * self.l[:, None, :]
        b = self.signs(self.u) * self.h[:, :, None]
        a = a.transpose(0, 1).reshape(self.in_features, p * r).to(dtype)
        b = b.transpose(0, 1).reshape(self.out_features, p * r).to(dtype)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else self.u.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        a, b = self.folded_factors(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return nn.functional.linear(nn.functional.linear(x.to(dtype), a.T), b, bias)

    def packed_state(self, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The deployment tensors: packed signs and the scales in ``scale_dtype``."""
        with torch.no_grad():
            state = {
                "u_signs": pack_signs(self.u),
                "v_signs": pack_signs(self.v.transpose(1, 2)),
                "h": self.h.to(scale_dtype),
                "l": self.l.to(scale_dtype),
                "g": self.g.to(scale_dtype),
            }
            if self.bias is not None:
                state["bias"] = self.bias.to(scale_dtype)
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual={self.residual}, bias={self.bias is not None}, sign={self.sign_function}"
        )
