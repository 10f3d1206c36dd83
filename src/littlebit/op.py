"""The packed LittleBit product, with a pure-PyTorch reference and pluggable faster backends.

    y = sum_p  h_p * (S_U,p @ (l_p * (S_V,p^T @ (g_p * x))))      (+ bias)

``u_signs``: int32 ``(P, d_out, ceil(r/32))``, rows of S_U packed along r.
``v_signs``: int32 ``(P, r, ceil(d_in/32))``, rows of S_V^T packed along d_in.
``h``: ``(P, d_out)``, ``l``: ``(P, r)``, ``g``: ``(P, d_in)``. P is 2 with the residual path.
With ``u_tiled`` the words of ``u_signs`` are in tile order (``packing.tile_order``), which backends
registered with ``tiled=True`` read as they are; the others get them back in row order.

The op ``littlebit::linear`` is declared once with ``torch.library``; its default implementation is
the reference. A backend is a function with the reference's signature plus a predicate saying which
calls it takes, registered for one device type (``register_backend``); the op's implementation for
that device (``register_kernel``) runs the first of its backends that accepts a call and the
reference for the rest. torch.compile and CUDA graphs see one opaque node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from littlebit.core.packing import unpack_signs, untile_order

# Unpack at most this many sign entries at once, so the reference never holds a large +-1 matrix.
_UNPACK_CHUNK = 1 << 22


def _signed_matmul(x: torch.Tensor, words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``x @ S^T`` where S (rows x n) is packed in ``words``; unpacks a block of rows at a time."""
    rows = words.shape[0]
    step = max(1, _UNPACK_CHUNK // max(n, 1))
    if step >= rows:
        return x @ unpack_signs(words, n, dtype).T
    out = [x @ unpack_signs(words[i : i + step], n, dtype).T for i in range(0, rows, step)]
    return torch.cat(out, dim=-1)


def littlebit_linear_reference(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = x.dtype
    d_in, rank = g.shape[-1], l.shape[-1]
    y = None
    for p in range(u_signs.shape[0]):
        t = _signed_matmul(x * g[p].to(dtype), v_signs[p], d_in, dtype)
        t = t * l[p].to(dtype)
        yp = _signed_matmul(t, u_signs[p], rank, dtype) * h[p].to(dtype)
        y = yp if y is None else y + yp
    if bias is not None:
        y = y + bias.to(dtype)
    return y


LinearFn = Callable[..., torch.Tensor]
Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]


@dataclass
class Backend:
    name: str
    device_type: str
    fn: LinearFn
    accepts: Predicate
    grouped: bool = False  # fn takes ``groups=`` (several layers on one input, one call)
    tiled: bool = False  # fn takes ``u_tiled=`` (u_signs in tile order)


_BACKENDS: dict[str, Backend] = {}
_forced: list[str] = []
_DEVICES_WITH_KERNELS: set[str] = set()


def register_backend(
    name: str,
    device_type: str,
    fn: LinearFn,
    accepts: Predicate,
    grouped: bool = False,
    tiled: bool = False,
) -> None:
    """Add a faster implementation for tensors on ``device_type`` ("cpu", "cuda");
    ``accepts(x, u_signs, v_signs)`` says which calls it can take; ``grouped``: ``fn`` also takes
    ``groups=``, ``tiled``: ``u_tiled=`` (see ``littlebit_linear``). Registering again replaces it."""
    _BACKENDS[name] = Backend(name, device_type, fn, accepts, grouped, tiled)
    if device_type not in _DEVICES_WITH_KERNELS:
        _linear_op.register_kernel(device_type, _dispatch_op)
        _DEVICES_WITH_KERNELS.add(device_type)


def available_backends() -> list[str]:
    return ["reference", *_BACKENDS]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend (``"reference"`` included) inside the block, e.g. to compare them."""
    if name != "reference" and name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select_backend(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> str:
    forced = _forced[-1] if _forced else os.environ.get("LITTLEBIT_BACKEND", "")
    if forced:
        return forced
    for b in _BACKENDS.values():
        if b.device_type == x.device.type and b.accepts(x, u_signs, v_signs):
            return b.name
    return "reference"


def group_layer(tensors: list[torch.Tensor], bias: torch.Tensor | None, groups: int, j: int) -> tuple:
    """Layer ``j`` of a grouped call: its slices of the stacked (u_signs, v_signs, h, l, g) and of bias."""
    if groups == 1:  # the whole call: no slicing on the host's path
        return tensors, bias
    P, d_out = tensors[0].shape[0] // groups, tensors[2].shape[-1]
    layer = [t[j * P : (j + 1) * P] for t in tensors]
    return layer, None if bias is None else bias[j * d_out : (j + 1) * d_out]


def _dispatch(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 1,
    u_tiled: bool = False,
) -> torch.Tensor:
    name = select_backend(x, u_signs, v_signs)
    backend = None if name == "reference" else _BACKENDS[name]
    if u_tiled and backend is not None and backend.tiled:
        kw = {"groups": groups} if groups > 1 else {}
        if groups == 1 or backend.grouped:
            return backend.fn(x, u_signs, v_signs, h, l, g, bias, u_tiled=True, **kw)
    if u_tiled:  # a transient row-ordered copy for a backend that reads rows
        u_signs = untile_order(u_signs)
    if groups == 1:
        fn = littlebit_linear_reference if backend is None else backend.fn
        return fn(x, u_signs, v_signs, h, l, g, bias)
    if backend is not None and backend.grouped:
        return backend.fn(x, u_signs, v_signs, h, l, g, bias, groups=groups)
    tensors = [u_signs, v_signs, h, l, g]
    layers = [group_layer(tensors, bias, groups, j) for j in range(groups)]
    return torch.cat([_dispatch(x, *layer, bj) for layer, bj in layers], dim=-1)


# The schema, with the reference as the implementation for every device without registered kernels.
@torch.library.custom_op("littlebit::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int = 1,
    u_tiled: bool = False,
) -> torch.Tensor:
    if u_tiled:
        u_signs = untile_order(u_signs)
    if groups == 1:
        return littlebit_linear_reference(x, u_signs, v_signs, h, l, g, bias).contiguous()
    layers = [group_layer([u_signs, v_signs, h, l, g], bias, groups, j) for j in range(groups)]
    return torch.cat([littlebit_linear_reference(x, *t, b) for t, b in layers], dim=-1)


def _dispatch_op(x, u_signs, v_signs, h, l, g, bias, groups=1, u_tiled=False):
    """The op on a device with registered backends: the first that accepts the call, else the reference."""
    return _dispatch(x, u_signs, v_signs, h, l, g, bias, groups, u_tiled).contiguous()


@_linear_op.register_fake
def _(x, u_signs, v_signs, h, l, g, bias, groups=1, u_tiled=False):
    return x.new_empty(*x.shape[:-1], groups * u_signs.shape[1])


def littlebit_linear(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 1,
    u_tiled: bool = False,
) -> torch.Tensor:
    """The packed product through the best backend that takes this call.

    ``u_tiled``: ``u_signs`` holds its words in tile order (``packing.tile_order``, what
    ``packed.prepare_for_decoding`` leaves on the GPU for the bit-serial kernel).

    ``groups`` > 1: that many layers of one shape applied to the same ``x``, outputs side by side
    (d_out each). Their tensors are stacked along the path axis (layer j owns paths ``j*P .. j*P + P -
    1``; ``bias`` is ``(groups * d_out,)``). Equal to concatenating each layer's product; a backend that
    supports it (the Triton GEMV) does them in one pair of launches, which is what batch-1 decoding of
    q/k/v or gate/up projections is bound by.
    """
    return _linear_op(x, u_signs, v_signs, h, l, g, bias, groups, u_tiled)
