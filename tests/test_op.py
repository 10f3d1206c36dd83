"""The ``littlebit::linear`` op as torch sees it: schema, fake tensors, per-device kernels, compile."""

from __future__ import annotations

import pytest
import torch

from littlebit.core.packing import pack_signs, tile_order
from littlebit.op import littlebit_linear, littlebit_linear_reference, use_backend
from littlebit.runtime.packed import PackedLittleBitLinear


def _packed(d_in: int, r: int, d_out: int, paths: int, groups: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = paths * groups
    u = pack_signs(torch.randn(p, d_out, r, generator=gen))
    v = pack_signs(torch.randn(p, r, d_in, generator=gen))
    h = torch.rand(p, d_out, generator=gen) + 0.5
    l = torch.rand(p, r, generator=gen) / r**0.5
    g = torch.rand(p, d_in, generator=gen) + 0.5
    return [u, v, h, l, g]


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(groups, bias):
    u, v, h, l, g = _packed(70, 24, 48, 2, groups)
    x = torch.randn(2, 5, 70)
    b = torch.randn(groups * 48) if bias else None
    torch.library.opcheck(torch.ops.littlebit.linear.default, (x, u, v, h, l, g, b, groups, False))


def test_opcheck_tiled():
    u, v, h, l, g = _packed(64, 40, 32, 2)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.littlebit.linear.default, (x, tile_order(u), v, h, l, g, None, 1, True))


def test_every_device_path_equals_the_reference():
    u, v, h, l, g = _packed(100, 40, 36, 2, seed=1)
    for tokens in (1, 7, 40):  # the CPU kernel takes the short ones, the reference the rest
        x = torch.randn(tokens, 100)
        with use_backend("reference"):
            ref = littlebit_linear(x, u, v, h, l, g)
        torch.testing.assert_close(littlebit_linear(x, u, v, h, l, g), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(littlebit_linear_reference(x, u, v, h, l, g), ref)


def test_compiles_as_one_opaque_op():
    layer = PackedLittleBitLinear(96, 40, 16)
    u, v, h, l, g = _packed(96, 16, 40, 2, seed=2)
    for name, t in zip(("u_signs", "v_signs", "h", "l", "g"), (u, v, h, l, g), strict=True):
        getattr(layer, name).copy_(t.to(getattr(layer, name).dtype))
    x = torch.randn(2, 9, 96)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
