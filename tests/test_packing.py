import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from littlebit.core.packing import n_words, pack_signs, tile_order, unpack_bits, unpack_signs, untile_order

SHAPES = [(1, 1), (3, 31), (2, 32), (5, 33), (7, 64), (4, 100), (1, 1000), (2, 3, 65), (16, 4096 + 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(shape, dtype):
    x = torch.randn(shape).to(dtype)
    words = pack_signs(x)
    assert words.dtype == torch.int32
    assert words.shape == (*shape[:-1], n_words(shape[-1]))
    signs = unpack_signs(words, shape[-1], dtype)
    assert signs.dtype == dtype
    assert torch.equal(signs, torch.where(x >= 0, 1.0, -1.0).to(dtype))


def test_bit_order_is_lsb_first_and_zero_is_positive():
    x = -torch.ones(1, 40)
    x[0, 0] = 0.0  # sign(0) = +1 -> bit 0 of word 0
    x[0, 31] = 1.0  # bit 31 of word 0: the int32 sign bit
    x[0, 33] = 2.0  # bit 1 of word 1
    words = pack_signs(x)
    assert words[0, 0].item() == (1 | (1 << 31)) - (1 << 32)
    assert words[0, 1].item() == 2  # padding bits (entries 40..63) stay clear


def test_unpack_checks_its_arguments():
    words = pack_signs(torch.randn(2, 40))
    with pytest.raises(ValueError):
        unpack_signs(words, 70)  # 2 words cannot hold 70
    with pytest.raises(ValueError):
        unpack_signs(words, 30)  # 30 would need 1 word, not 2
    with pytest.raises(TypeError):
        unpack_signs(words.to(torch.int64), 40)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 8),
    n=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (rows, n), generator=g).bool()
    x = torch.where(bits, 1.0, -1.0)
    words = pack_signs(x)
    assert torch.equal(unpack_bits(words, n), bits)
    # the packed bytes are exactly the bits: count set bits per row
    popcount = sum(((words >> b) & 1).sum(-1) for b in range(32))
    assert torch.equal(popcount, bits.sum(-1))


def test_device_cuda_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x = torch.randn(3, 77, device="cuda")
    assert torch.equal(unpack_signs(pack_signs(x), 77).cpu(), torch.where(x.cpu() >= 0, 1.0, -1.0))


@settings(max_examples=100, deadline=None)
@given(
    paths=st.integers(1, 3),
    tiles=st.integers(1, 4),
    W=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_tile_order_is_a_permutation_with_an_inverse(paths, tiles, W, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (paths, 16 * tiles, W)
    words = torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)
    tiled = tile_order(words)
    assert tiled.shape == words.shape and tiled.dtype == torch.int32
    assert torch.equal(untile_order(tiled), words)
    # each 16-row tile keeps its own words (a permutation inside the tile)
    for p in range(paths):
        for t in range(tiles):
            mine = words[p, 16 * t : 16 * t + 16].flatten().sort().values
            assert torch.equal(tiled[p, 16 * t : 16 * t + 16].flatten().sort().values, mine)


def test_tile_order_layout():
    """Block kb of a tile: lane 4 g + q holds word 8 kb + 2q of rows g and g + 8, then word 8 kb + 2q + 1
    of both; the last W % 8 words of the tile's rows follow, row by row."""
    W = 19
    words = torch.arange(16 * W, dtype=torch.int32).view(1, 16, W)
    flat = tile_order(words).flatten()
    for kb in range(2):
        for g in range(8):
            for q in range(4):
                at = 128 * kb + 4 * (4 * g + q)
                w = 8 * kb + 2 * q
                lo, hi = g * W + w, (g + 8) * W + w  # rows g and g + 8
                assert flat[at : at + 4].tolist() == [lo, hi, lo + 1, hi + 1]
    assert flat[256:].tolist() == [row * W + w for row in range(16) for w in range(16, 19)]
    with pytest.raises(ValueError, match="multiples of 16"):
        tile_order(torch.zeros(1, 20, 4, dtype=torch.int32))
