import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from torch import nn

from littlebit import LittleBitConfig, LittleBitError, LittleBitLinear
from littlebit.core.baselines import apply_baseline
from littlebit.core.convert import SplitLinear, convert, decoder_linear_names


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_decoder_linear_is_converted(arch):
    model = tiny_model(arch)
    names = decoder_linear_names(model)
    head = model.get_output_embeddings()
    report = convert(model, LittleBitConfig(bpw=2.0), progress=False)
    assert names and len(report.layers) >= len(names)
    for name in names:
        assert isinstance(model.get_submodule(name), (LittleBitLinear, SplitLinear))
    assert type(model.get_output_embeddings()) is nn.Linear and model.get_output_embeddings() is head
    assert not any(isinstance(m, LittleBitLinear) for m in model.get_input_embeddings().modules())
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 7, 256) and torch.isfinite(logits).all()


def test_phi3_fused_projections_give_k_and_v_their_own_budget():
    model = tiny_model("phi3")
    cfg = LittleBitConfig(bpw=8.0, kv_rank_multiplier=0.5)
    report = convert(model, cfg, progress=False)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, SplitLinear) and list(qkv.parts) == ["q", "k", "v"]
    assert [p.out_features for p in qkv.parts.values()] == [64, 32, 32]
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert ranks["model.layers.0.self_attn.qkv_proj[k]"] < ranks["model.layers.0.self_attn.qkv_proj[q]"]
    assert list(model.model.layers[0].mlp.gate_up_proj.parts) == ["gate", "up"]


def test_split_matches_fused_forward_at_full_rank():
    """With rank >= min(d_in, d_out) and the residual path, parts should reproduce the fused layer closely."""
    model = tiny_model("phi3")
    layer = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, 64)
    ref = layer(x)
    convert(model, LittleBitConfig(bpw=15.0), progress=False)
    out = model.model.layers[0].self_attn.qkv_proj(x)
    assert out.shape == ref.shape


def test_model_without_decoder_linears_is_refused():
    class Empty(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(LittleBitError, match="no linear layers"):
        convert(Empty(), LittleBitConfig(bpw=1.0), progress=False)


def test_conversion_is_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    convert(a, LittleBitConfig(bpw=2.0, seed=5), progress=False)
    convert(b, LittleBitConfig(bpw=2.0, seed=5), progress=False)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na


@pytest.mark.parametrize("kind", ["svd", "onebit"])
def test_baselines_replace_the_same_layers(kind):
    model = tiny_model("llama")
    names = decoder_linear_names(model)
    report = apply_baseline(model, kind, bpw=1.0)
    assert [layer.name for layer in report.layers] == names
    if kind == "onebit":
        for layer in report.layers:  # one sign bit per weight plus two 16-bit vectors
            a, b = layer.d_in, layer.d_out
            assert layer.bpw == pytest.approx(1 + 16 * (a + b) / (a * b))
    else:
        assert all(layer.bpw <= 1.0 + 1e-9 for layer in report.layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 5))).logits).all()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_attention_bpw_factor_moves_bits_at_the_same_mean(arch):
    """The attention projections' targets at the factor times bpw, the others lower, their mean over
    all weights at bpw; ranks follow the targets and no layer exceeds its own."""
    from littlebit.core.convert import budget, is_attention

    model = tiny_model(arch)
    uniform = budget(model, LittleBitConfig(bpw=6.0))
    split = budget(model, LittleBitConfig(bpw=6.0, attention_bpw_factor=1.5))
    weights = [layer.n_weights for layer in split.layers]
    attention = [is_attention(layer.name) for layer in split.layers]
    assert any(attention) and not all(attention)
    mean = sum(w * layer.target_bpw for w, layer in zip(weights, split.layers, strict=True)) / sum(weights)
    assert mean == pytest.approx(6.0)
    for a, u, s in zip(attention, uniform.layers, split.layers, strict=True):
        assert s.target_bpw == pytest.approx(9.0) if a else s.target_bpw < 6.0
        assert s.rank >= u.rank if a else s.rank <= u.rank
        assert s.bpw <= s.target_bpw + 1e-9
    assert split.bpw_linear <= 6.0


def test_attention_bpw_factor_too_large_or_not_positive_is_refused():
    model = tiny_model("llama")  # attention: 2 * 64 * 64 + 2 * 64 * 32 of 4 * 64 * 64 + ... weights
    with pytest.raises(LittleBitError, match="leaves no bits for the other layers"):
        convert(model, LittleBitConfig(bpw=1.0, attention_bpw_factor=4.0), progress=False)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LittleBitError, match="attention_bpw_factor must be a finite number > 0"):
            LittleBitConfig(attention_bpw_factor=bad)
        with pytest.raises(LittleBitError, match="kv_rank_multiplier must be a finite number > 0"):
            LittleBitConfig(kv_rank_multiplier=bad)


def test_attention_bpw_factor_one_is_the_uniform_plan():
    from littlebit.core.convert import plan

    model = tiny_model("llama")
    a = plan(model, LittleBitConfig(bpw=2.0))
    b = plan(model, LittleBitConfig(bpw=2.0, attention_bpw_factor=1.0))
    assert [(t.name, t.rank, t.target_bpw) for t in a] == [(t.name, t.rank, t.target_bpw) for t in b]
