"""The bit-serial batch-1 GEMV (``kernels.cuda_bitserial``): its pure-PyTorch reference on CPU, the
CUDA kernels against it (planes bit for bit) and against the fp32 layer on the GPU."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels import (
    DEVICE,
    ON_GPU,
    TOL,
    assert_workspaces_clean,
    cuda_cpp_kernels,
    grouped_layers,
    make_layer,
    plane_bits,
    rel_err,
)

from littlebit.core.packing import tile_order
from littlebit.kernels.gpu import cuda_bitserial as bs

# (d_in, r, d_out): words of 1, 3, 5, 10, 17, 99 (odd: 4-byte loads) and 100 (even: 8-byte loads)
SHAPES = [(64, 8, 24), (100, 70, 100), (576, 150, 300), (1000, 296, 576), (4096, 544, 1000),
          (2048, 3168, 520), (520, 3200, 90)]  # fmt: skip
# (16-row tiles a warp, warps splitting a row group's units, row groups, units in flight); zeros: the
# rules' own tiles; (3, 2, 1, 2): a bit-serial stage 1 of 48 rows a program, which cannot quantize t
TILES = [(1, 1, 1, 1), (2, 2, 2, 4), (1, 4, 2, 2), (4, 2, 1, 3), (1, 8, 1, 2), (3, 2, 1, 2), (0, 0, 0, 0)]
TILED = [(2, 2, 2, 4, True), (1, 4, 2, 2, True)]  # signs in tile order (``packing.tile_order``)
# shapes whose Triton stage-1 row blocks tile the 256-row quantization blocks
FUSED_SHAPES = [(1000, 296, 576), (4096, 544, 900), (8192, 3168, 520), (2048, 900, 64)]


def _signs(paths: int, rows: int, W: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (paths, rows, W), generator=gen, dtype=torch.int64).to(torch.int32)


def reference_gemv(
    v: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, paths: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``quantize`` then ``gemv`` in fp64 on unpacked bits: (groups * rows,) for vectors ``v``
    (groups * paths, n) and ``signs`` (groups * paths, rows, W)."""
    G = signs.shape[0] // paths
    W = signs.shape[2]
    nkb = bs.n_blocks(W)
    planes, scales = bs.reference_quantize(v, W)
    pbits = plane_bits(planes, nkb).double()
    sbits = (signs.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=v.device)) & 1
    sbits = sbits.flatten(-2).double()  # (P, rows, 32 W)
    sbits = torch.nn.functional.pad(sbits, (0, nkb * bs.BLOCK - sbits.shape[-1])).view(
        -1, signs.shape[1], nkb, bs.BLOCK
    )
    counts = torch.einsum("prkb,pkbn->prkn", sbits, pbits)  # (P, rows, nkb, 16)
    weights = torch.tensor(bs._PLANE_WEIGHTS, dtype=torch.float64, device=v.device)
    sc = scales.double()
    acc = (counts @ weights) * sc[:, None, :, 0] - sc[:, None, :, 1]  # (P, rows, nkb)
    y = (2 * h.double() * acc.sum(-1)).view(G, paths, -1).sum(1).flatten()
    return y if bias is None else y + bias.double().flatten()


@pytest.mark.parametrize("rows,n", [(5, 8), (40, 300), (17, 1000), (64, 3168)])
def test_reference_gemv_is_the_signed_product(rows, n):
    """The bit-plane algebra (16-bit blocks of 256, counts of set signs, constant per block) gives
    sum_p h_p (S_p v_p) to the quantization's precision, even with magnitudes over 4 decades."""
    gen = torch.Generator().manual_seed(rows + n)
    W = math.ceil(n / 32)
    v = torch.randn(2, n, generator=gen) * 10 ** (4 * torch.rand(2, n, generator=gen) - 2)
    signs, h = _signs(2, rows, W, gen), torch.rand(2, rows, generator=gen) + 0.5
    bits = ((signs.long().unsqueeze(-1) >> torch.arange(32)) & 1).flatten(-2)[..., :n].double() * 2 - 1
    exact = sum(h[p].double() * (bits[p] @ v[p].double()) for p in range(2))
    y = reference_gemv(v, signs, h, paths=2)
    assert ((y - exact).norm() / exact.norm()).item() < 2e-4


def test_reference_quantize_layout():
    """Thread (g, q) of a block finds planes g and 8 + g of words 2q and 2q + 1 at [4 g + q]."""
    v = torch.zeros(1, 256)
    v[0, 2 * 32 + 5] = 1.0  # word 2, bit 5: q = 1's first word; every plane of 32767 = 0x7FFF set
    planes, scales = bs.reference_quantize(v, 8)
    assert planes.shape == (1, 1, 32, 4) and torch.allclose(scales[0, 0], torch.tensor([1 / 32767, 0.5]))
    for g in range(8):
        assert planes[0, 0, 4 * g + 1].tolist() == [1 << 5, 0, (1 << 5) if g < 7 else 0, 0]
    assert int(planes.ne(0).sum()) == 15


gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA C++ kernels: need a GPU")


@pytest.fixture(scope="module")
def tk():
    return cuda_cpp_kernels(bs, lambda: bs._functions(bs.BitTile(), 2, False, 0))


# stage 1: bit-serial too (quantizing in the kernel, or in launches of their own); Triton ending in
# the planes of t; Triton writing t, then the quantize kernel
STAGE1 = {
    "bits": {"stage1_bitserial": True, "quantize_in_stage1": True},  # quantizing t itself
    "bits-launches": {"stage1_bitserial": True, "quantize_in_stage1": False},  # the quantize kernel, twice
    "planes": {"stage1_bitserial": False, "quantize_in_stage1": True},
    "t": {"stage1_bitserial": False, "quantize_in_stage1": False},
}


def _config(tk, tile=(0, 0, 0, 0), stage1="bits"):
    mt, ks, rg, depth, *_ = tile
    kw = {"bits_rows": mt, "bits_split": ks, "bits_groups": rg, "bits_depth": depth}
    kw |= {"bits1_rows": mt, "bits1_split": ks, "bits1_groups": rg, "bits1_depth": depth}
    return tk.KernelConfig(stage2_bitserial=True, **STAGE1[stage1], **kw)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 300, 3168, 8192])
def test_quantize_kernel_matches_reference_bit_for_bit(tk, n, dtype):
    gen = torch.Generator().manual_seed(n)
    W, P = math.ceil(n / 32), 3
    t = (torch.randn(P, 32 * W, generator=gen) * 10 ** (2 * torch.rand(P, 32 * W, generator=gen) - 1)).to(
        DEVICE
    )
    ws = torch.full((bs.workspace_floats(P, W),), float("nan"), device=DEVICE)
    bs.quantize(t, ws, n, W, P, False, 32 * W)  # entries past n read as zero
    planes, scales = bs.split_workspace(ws, P, W)
    ref_planes, ref_scales = bs.reference_quantize(t[:, :n].cpu(), W)
    assert torch.equal(planes.cpu().view_as(ref_planes), ref_planes)
    assert torch.equal(scales.cpu().view_as(ref_scales), ref_scales)
    x = torch.randn(1, n, generator=gen).to(dtype).to(DEVICE)
    g = (torch.rand(P, n, generator=gen) + 0.5).to(dtype).to(DEVICE)
    bs.quantize(x, ws, n, W, P, False, 0, g)  # x * g per path, in fp32
    ref_planes, ref_scales = bs.reference_quantize((x.float() * g.float()).cpu(), W)
    got = scales.cpu().view_as(ref_scales)
    bad = (got != ref_scales).nonzero()
    assert bad.numel() == 0, [
        (i, got[tuple(i)].item(), ref_scales[tuple(i)].item()) for i in bad[:6].tolist()
    ]
    diff = (planes.cpu().view_as(ref_planes) != ref_planes).nonzero()
    assert diff.numel() == 0, (diff[:8].tolist(), len(diff))


@gpu
@pytest.mark.parametrize("paths,groups", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("tile", [*TILES, *TILED])
def test_gemv_kernel_matches_reference(tk, tile, paths, groups):
    gen = torch.Generator().manual_seed(paths + 7 * groups)
    for rows, n in [(24, 8), (100, 70), (300, 520), (90, 3200), (520, 3168)]:
        if len(tile) > 4 and tile[4]:
            rows = -(-rows // 16) * 16  # tile order: whole 16-row tiles
        W, P = math.ceil(n / 32), paths * groups
        v = torch.randn(P, n, generator=gen)
        signs = _signs(P, rows, W, gen)
        h = (torch.rand(P, rows, generator=gen) + 0.5).half()
        bias = torch.randn(groups * rows, generator=gen).half()
        ws = torch.empty(bs.workspace_floats(P, W), device=DEVICE)
        bs.quantize(v.to(DEVICE), ws, n, W, P, False, n)
        out = torch.empty(groups * rows, device=DEVICE)
        tl = (
            tk._bit_tile(rows, W, groups, tk.KernelConfig(), 132)
            if tile == (0, 0, 0, 0)
            else bs.BitTile(*tile)
        )
        words = tile_order(signs) if tl.tiled else signs
        bs.gemv(ws, words.to(DEVICE), h.to(DEVICE), bias.to(DEVICE), out, W, paths, groups, tl, False)
        ref = reference_gemv(v, signs, h.float(), paths, bias.float())
        assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-5, (rows, n)


@gpu
@pytest.mark.parametrize("stage1", list(STAGE1))
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_in,r,d_out", SHAPES)
@pytest.mark.parametrize("paths", [1, 2])
def test_bitserial_layer_matches_reference(tk, d_in, r, d_out, paths, dtype, tile, stage1):
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, paths, dtype, DEVICE, seed=d_in + r + paths)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(r)).to(dtype).to(DEVICE)
    cfg = _config(tk, tile, stage1)
    assert tk._use_bitserial(x, h, bias, cfg, 1)
    for b in (bias, None):
        y = tk.littlebit_linear_triton(x, u, v, h, l, g, b, config=cfg)
        assert y.shape == (1, d_out) and y.dtype == dtype and torch.isfinite(y).all()
        assert rel_err(y, x, u, v, h, l, g, b) < TOL


@gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_in,r,d_out", [(2048, 3168, 1024), (8192, 1100, 4096), (520, 3200, 656)])
def test_tiled_signs_give_the_same_outputs(tk, d_in, r, d_out, dtype, m):
    """S_U in tile order: the bit-serial stage 2 (one token) reads it as it is and gives what row order
    gives, bit for bit; the tensor-core path (more tokens; its stage 1 adds with atomics, so not bit for
    bit) matches the reference."""
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, 2, dtype, DEVICE, seed=d_in + r + m)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    assert m > 1 or tk._takes_tiled(x, u, h, bias, tk.KernelConfig())
    for b in (bias, None):
        y = tk.littlebit_linear_triton(x, tile_order(u), v, h, l, g, b, u_tiled=True)
        if m == 1:
            assert torch.equal(y, tk.littlebit_linear_triton(x, u, v, h, l, g, b))
        assert rel_err(y, x, u, v, h, l, g, b) < TOL


@gpu
@pytest.mark.parametrize("groups", [2, 3])
def test_bitserial_grouped(tk, groups):
    d_in, d_out = 1000, 300
    layers, stacked, b = grouped_layers(d_in, 296, d_out, 2, groups)
    x = torch.randn(1, d_in, device=DEVICE).half()
    for stage1 in STAGE1:
        y = tk.littlebit_linear_triton(x, *stacked, b, config=_config(tk, stage1=stage1), groups=groups)
        for j, layer in enumerate(layers):
            assert rel_err(y[:, j * d_out : (j + 1) * d_out], x, *layer) < TOL, j


@gpu
@pytest.mark.parametrize("stage1", list(STAGE1))
def test_bitserial_deterministic_and_accurate(tk, stage1):
    layer = make_layer(8192, 3168, 4096, 2, torch.float16, DEVICE, seed=7)
    x = torch.randn(1, 8192, device=DEVICE).half()
    cfg = _config(tk, stage1=stage1)
    first = tk.littlebit_linear_triton(x, *layer, config=cfg)
    assert rel_err(first, x, *layer) < 2e-3
    for _ in range(20):
        assert torch.equal(tk.littlebit_linear_triton(x, *layer, config=cfg), first)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_in,r,d_out", FUSED_SHAPES)
def test_stage1_planes_equal_the_quantize_kernels(tk, d_in, r, d_out, dtype):
    """Stage 1 quantizing for itself (``quantize_in_stage1``) writes the planes the quantize kernel
    makes of the t it would have written: the same outputs, bit for bit."""
    layer = make_layer(d_in, r, d_out, 2, dtype, DEVICE, seed=d_in + 3 * r)
    x = torch.randn(1, d_in, device=DEVICE).to(dtype)
    for pair in (("planes", "t"), ("bits", "bits-launches")):
        ys = [tk.littlebit_linear_triton(x, *layer, config=_config(tk, stage1=s)) for s in pair]
        assert torch.equal(*ys), pair
    br = tk._stage1_geometry((d_in + 31) // 32, r, 2, tk.KernelConfig(), tk._num_sms(0))[1]
    assert 256 % br == 0  # these shapes take the fused path


@gpu
def test_bitserial_not_used_where_it_cannot_run(tk):
    h16 = torch.ones(2, 8, device=DEVICE, dtype=torch.float16)
    cfg = _config(tk)
    x1 = torch.ones(1, 64, device=DEVICE, dtype=torch.float16)
    assert tk._use_bitserial(x1, h16, None, cfg, 1)
    assert tk._use_bitserial(x1, h16.bfloat16(), None, cfg, 1)
    assert not tk._use_bitserial(torch.ones(2, 64, device=DEVICE, dtype=torch.float16), h16, None, cfg, 1)
    assert not tk._use_bitserial(x1, h16.float(), None, cfg, 1)
    assert not tk._use_bitserial(x1, h16, h16[0].bfloat16(), cfg, 1)  # bias of another dtype
    assert not tk._use_bitserial(x1, h16, None, tk.KernelConfig(stage2_bitserial=False), 1)
    lo, w = tk._BITSERIAL_WORDS, tk._BITSERIAL_RANK_WORDS  # by default only where it won
    assert tk._use_bitserial(x1, h16, None, tk.KernelConfig(), lo, w)
    assert not tk._use_bitserial(x1, h16, None, tk.KernelConfig(), lo - 1, w)
    assert not tk._use_bitserial(x1, h16, None, tk.KernelConfig(), 100 * lo, w - 1)


@gpu
@pytest.mark.parametrize("stage1", list(STAGE1))
def test_bitserial_reads_only_what_it_wrote(tk, stage1):
    """Workspaces filled with NaN between calls: the result is finite and right only if every plane,
    scale and t entry a call reads was written by that call."""
    layer = make_layer(1000, 1100, 700, 2, torch.float16, DEVICE, seed=5)
    x = torch.randn(1, 1000, device=DEVICE).half()
    cfg = _config(tk, stage1=stage1)
    tk.littlebit_linear_triton(x, *layer, config=cfg)  # creates the workspaces
    for key, ws in tk._WORKSPACES.items():  # the others must stay zero between calls
        if key[-1] in ("bits", "reduce"):
            ws.t.fill_(float("nan"))
    y = tk.littlebit_linear_triton(x, *layer, config=cfg)
    assert torch.isfinite(y).all() and rel_err(y, x, *layer) < TOL
    assert_workspaces_clean(tk)  # tickets back to zero for the next call
