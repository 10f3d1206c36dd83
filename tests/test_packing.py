import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from littlebit.packing import n_words, pack_signs, unpack_bits, unpack_signs

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
