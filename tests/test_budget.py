import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.budget import layer_bits, layer_bpw, packed_bytes, rank_for_bpw
from littlebit.core.convert import budget

dims = st.integers(min_value=8, max_value=20000)
bpws = st.floats(min_value=0.01, max_value=15.9)


def paper_bpw(a: int, b: int, r: int, residual: bool) -> float:
    """LITTLEBIT.md section 4, written out independently of the implementation."""
    if residual:
        return (2 * r * (a + b + 16) + 32 * (a + b)) / (a * b)
    return (r * (a + b + 16) + 16 * (a + b)) / (a * b)


@given(a=dims, b=dims, r=st.integers(1, 4096), residual=st.booleans())
def test_bpw_equals_paper_formula(a, b, r, residual):
    assert layer_bpw(a, b, r, residual) == pytest.approx(paper_bpw(a, b, r, residual), rel=1e-12)
    assert layer_bits(a, b, r, residual) == round(paper_bpw(a, b, r, residual) * a * b)


@settings(max_examples=300)
@given(a=dims, b=dims, bpw=bpws, residual=st.booleans())
def test_rank_is_largest_multiple_of_8_within_budget(a, b, bpw, residual):
    r = rank_for_bpw(a, b, bpw, residual)
    assert r % 8 == 0 and r >= 8
    assert r <= max(8, min(a, b) // 8 * 8)
    if r > 8:  # the floor only binds at the minimum rank
        assert layer_bpw(a, b, r, residual) <= bpw + 1e-9
    cap = max(8, min(a, b) // 8 * 8)
    if r < cap:  # the next multiple of 8 would overshoot the target
        assert layer_bpw(a, b, r + 8, residual) > bpw


@given(a=dims, b=dims, bpw=st.floats(0.05, 8.0), residual=st.booleans())
def test_rank_grows_with_budget(a, b, bpw, residual):
    assert rank_for_bpw(a, b, bpw, residual) <= rank_for_bpw(a, b, bpw * 1.5, residual)


@given(a=dims, b=dims, r=st.integers(1, 2048), residual=st.booleans())
def test_packed_bytes_cover_the_bits(a, b, r, residual):
    exact = layer_bits(a, b, r, residual) / 8
    got = packed_bytes(a, b, r, residual)
    assert got >= exact
    # padding to 32-bit words costs at most one word per row of each sign matrix
    assert got <= exact + (2 if residual else 1) * 4 * (a + b + 2 * r)


def test_known_ranks_of_llama7b_shapes():
    # 4096 x 4096 at 1.0 BPW with residual: r = (2^24 - 32*8192) / (2*8208) = 1006.1 -> 1000
    assert rank_for_bpw(4096, 4096, 1.0, True) == 1000
    # 0.1 BPW: (1677721.6 - 262144) / 16416 = 86.2 -> 80
    assert rank_for_bpw(4096, 4096, 0.1, True) == 80
    assert rank_for_bpw(4096, 4096, 1.0, False) == math.floor((2**24 - 16 * 8192) / 8208) // 8 * 8


@pytest.mark.parametrize("bad", [0.0, -1.0, 16.0, 100.0])
def test_bad_bpw_is_refused(bad):
    with pytest.raises(LittleBitError):
        LittleBitConfig(bpw=bad)
    with pytest.raises(LittleBitError):
        rank_for_bpw(64, 64, bad, True)


def test_model_report_and_small_layer_warning(tiny_llama):
    report = budget(tiny_llama, LittleBitConfig(bpw=0.3))
    assert len(report.layers) == 14
    for layer in report.layers:
        assert layer.bpw == pytest.approx(paper_bpw(layer.d_in, layer.d_out, layer.rank, True))
    # 64x64 layers cannot get below 32*(128)/4096 = 1 BPW with a residual path
    msg = report.warning()
    assert msg is not None and "model.layers.[0-1].self_attn.q_proj (64x64: 1.562 > 0.300)" in msg
    assert report.bpw_total > report.bpw_linear
    d = report.to_dict()
    assert {"bpw_linear", "bpw_total", "n_params", "layers"} <= set(d)


def test_kv_multiplier_and_overrides(tiny_llama):
    cfg = LittleBitConfig(
        bpw=8.0,
        kv_rank_multiplier=0.5,
        overrides=[{"pattern": "*.mlp.down_proj", "rank": 24}],
        skip=["model.layers.1.*"],
    )
    report = budget(tiny_llama, cfg)
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert all(not n.startswith("model.layers.1.") for n in ranks)
    assert ranks["model.layers.0.mlp.down_proj"] == 24
    full_k = rank_for_bpw(64, 32, 8.0, True)  # k_proj is 32x64
    assert ranks["model.layers.0.self_attn.k_proj"] == max(8, full_k // 2 // 8 * 8)
    assert ranks["model.layers.0.self_attn.q_proj"] == rank_for_bpw(64, 64, 8.0, True)


def test_config_json_round_trip():
    cfg = LittleBitConfig(bpw=0.3, residual=False, overrides=[{"pattern": "x", "bpw": 1.0}], skip=["a*"])
    again = LittleBitConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(LittleBitError):
        LittleBitConfig.from_dict({"bpw": 1.0, "nonsense": 1})
    with pytest.raises(LittleBitError):
        LittleBitConfig.from_dict({"bpw": 1.0, "version": 99})


@pytest.mark.parametrize(
    "edit",
    [
        {"rank_multiple": 0},
        {"min_rank": 0},
        {"skip": [1]},
        {"skip": "abc"},
        {"residual": "no"},
        {"seed": "a"},
        {"seed": -1},
        {"version": -1},
        {"smooth_alpha": float("nan")},
        {"smooth_alpha": -1.0},
        {"bpw": "1"},
        {"init": 3},
        {"overrides": [{"pattern": 3, "bpw": 1.0}]},
        {"overrides": [{"pattern": "*", "bits": 1.0}]},
        {"overrides": [{"pattern": "*", "rank": 1.5}]},
        {"overrides": "*"},
    ],
)
def test_config_file_values_of_the_wrong_kind_are_refused(edit):
    data = {**LittleBitConfig().to_dict(), **edit}
    with pytest.raises(LittleBitError):
        LittleBitConfig.from_dict(data)
