"""The tensor-core stage 2 of the batch-1 GEMV (``kernels.cuda_mma``) against the fp32 reference.

It is CUDA C++ compiled by NVRTC, so it only runs on a GPU (chained calls under PDL and CUDA graphs:
``test_kernels.test_triton_chained_calls_wait_for_their_input``); the layouts it reads (t as fp16 pairs, a
word's 16 contiguous) are the Triton stage 1's, which the interpreted tests check on CPU.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, ON_GPU, TOL, cuda_cpp_kernels, grouped_layers, make_layer, rel_err

pytestmark = pytest.mark.skipif(not ON_GPU, reason="CUDA C++ kernel: needs a GPU")

# (d_in, r, d_out): word rows of 1, 3, 5, 10, 17, 99 words; d_out off the 16/32-row tiles
SHAPES = [
    (64, 8, 24),
    (100, 70, 100),
    (576, 150, 300),
    (1000, 296, 576),
    (4096, 544, 1000),
    (2048, 3168, 520),
]
# (16-row tiles, words a thread, warps); the rule's own tiles (4, 1, 4), (2, 1, 8), (4, 1, 8),
# (1, 2, 8) and whatever it picks for the shape (zeros)
TILES = [(1, 1, 1), (2, 4, 4), (2, 1, 2), (4, 2, 4)]
TILES += [(4, 1, 4), (2, 1, 8), (4, 1, 8), (1, 2, 8), (0, 0, 0)]


def _mma_config(tk, tile=(0, 0, 0), **kw):
    mt, wpt, warps = tile
    kw |= {"mma_rows": mt, "mma_words": wpt, "mma_warps": warps}
    return tk.KernelConfig(stage2_mma=True, stage2_bitserial=False, **kw)


@pytest.fixture(scope="module")
def tk():
    from littlebit.kernels.gpu import cuda_mma

    return cuda_cpp_kernels(cuda_mma, lambda: cuda_mma._function(cuda_mma.MmaTile(), 0))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("d_in,r,d_out", SHAPES)
@pytest.mark.parametrize("paths", [1, 2])
def test_mma_stage2_matches_reference(tk, d_in, r, d_out, paths, tile):
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, paths, torch.float16, DEVICE, seed=d_in + r + paths)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(r)).half().to(DEVICE)
    cfg = _mma_config(tk, tile)
    assert tk._use_mma(x, h, bias, cfg, True, 32)
    for b in (bias, None):
        y = tk.littlebit_linear_triton(x, u, v, h, l, g, b, config=cfg)
        assert y.shape == (1, d_out) and torch.isfinite(y).all()
        assert rel_err(y, x, u, v, h, l, g, b) < TOL


def test_mma_stage2_is_more_accurate_than_fp16_sums(tk):
    """fp32 sums over whole rows: on a long row the error is below the CUDA-core path's."""
    layer = make_layer(4096, 3168, 1024, 2, torch.float16, DEVICE, seed=3)
    x = torch.randn(1, 4096, device=DEVICE).half()
    e_mma = rel_err(tk.littlebit_linear_triton(x, *layer, config=_mma_config(tk)), x, *layer)
    cuda_cores = tk.KernelConfig(stage2_mma=False, stage2_bitserial=False)
    e_cc = rel_err(tk.littlebit_linear_triton(x, *layer, config=cuda_cores), x, *layer)
    assert e_mma < 2e-3 and e_mma <= e_cc * 1.05


@pytest.mark.parametrize("groups", [2, 3])
def test_mma_stage2_grouped(tk, groups):
    d_in, d_out = 1000, 300
    layers, stacked, b = grouped_layers(d_in, 296, d_out, 2, groups)
    x = torch.randn(1, d_in, device=DEVICE).half()
    y = tk.littlebit_linear_triton(x, *stacked, b, config=_mma_config(tk), groups=groups)
    for j, layer in enumerate(layers):
        assert rel_err(y[:, j * d_out : (j + 1) * d_out], x, *layer) < TOL, j


def test_mma_stage2_not_used_where_it_cannot_run(tk):
    h16 = torch.ones(2, 8, device=DEVICE, dtype=torch.float16)
    cfg = _mma_config(tk)
    x1 = torch.ones(1, 64, device=DEVICE, dtype=torch.float16)
    assert tk._use_mma(x1, h16, None, cfg, True, 32)
    assert not tk._use_mma(torch.ones(2, 64, device=DEVICE, dtype=torch.float16), h16, None, cfg, True, 32)
    assert not tk._use_mma(x1, h16, None, cfg, False, 32)  # bf16 / plain decoding
    assert not tk._use_mma(x1, h16, None, cfg, True, 48)  # stage-1 blocks not whole words
    assert not tk._use_mma(x1, h16.bfloat16(), None, cfg, True, 32)
    assert not tk._use_mma(x1, h16, None, tk.KernelConfig(stage2_mma=False), True, 32)
    lo = tk._MMA_WORDS  # by default only for S_U sizes where it won
    assert tk._use_mma(x1, h16, None, tk.KernelConfig(), True, 32, lo)
    assert tk._use_mma(x1, h16, None, tk.KernelConfig(), True, 32, 100 * lo)
    assert not tk._use_mma(x1, h16, None, tk.KernelConfig(), True, 32, lo - 1)


def test_mma_stage2_deterministic(tk):
    layer = make_layer(8192, 296, 4096, 2, torch.float16, DEVICE, seed=7)
    x = torch.randn(1, 8192, device=DEVICE).half()
    cfg = _mma_config(tk)
    first = tk.littlebit_linear_triton(x, *layer, config=cfg)
    for _ in range(30):
        assert torch.equal(tk.littlebit_linear_triton(x, *layer, config=cfg), first)
