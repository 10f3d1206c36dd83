"""Grouped projections (q/k/v, gate/up as one call) give the same model outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from littlebit.runtime.grouping import GroupedProjection, GroupMember, group_projections
from littlebit.runtime.packed import PackedLittleBitLinear, prepare_for_decoding
from littlebit.runtime.synthetic import random_packed_llama

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
TINY["vocab_size"] = 300


@pytest.mark.parametrize("kv_heads,expected", [(4, 4), (2, 4)])
def test_grouped_packed_model_matches(kv_heads, expected):
    """Without grouped-query attention q/k/v form one group; with it only k and v do (q is wider)."""
    model = random_packed_llama("llama-2-7b", 0.3, "cpu", torch.float32, num_key_value_heads=kv_heads, **TINY)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert group_projections(model) == expected
        out = model(ids).logits
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, GroupMember) and isinstance(attn.v_proj, GroupMember)
    assert isinstance(attn.q_proj, GroupMember) == (kv_heads == 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_dense_model_matches():
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        assert group_projections(model) == 4
        assert isinstance(model.model.layers[1].mlp.grouped_gate_up, GroupedProjection)
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_member_called_on_another_input_raises():
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    group_projections(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        mlp(x)
        with pytest.raises(RuntimeError, match="another tensor"):
            mlp.up_proj(x.clone())


def test_mismatched_layers_refused():
    with pytest.raises(ValueError, match="one shape"):
        GroupedProjection([torch.nn.Linear(4, 4), torch.nn.Linear(5, 4)])


def test_tiled_signs_work_everywhere_and_save_in_row_order():
    """Layers with S_U in tile order (``tile_u_signs``, what ``prepare_for_decoding`` does on a GPU)
    give the same logits through any backend and grouped, and their state dict keeps row order."""
    shape = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=1, num_attention_heads=4)
    model = random_packed_llama("llama-2-7b", 1.0, "cpu", torch.float32, vocab_size=300, **shape)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    rows = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_for_decoding(model) == 0  # no GPU kernel here: nothing pays
    with torch.no_grad():
        ref = model(ids).logits
        layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLittleBitLinear)}
        for m in layers.values():
            m.tile_u_signs()
        moved = [n for n, m in layers.items() if not torch.equal(m.u_signs, rows[n + ".u_signs"])]
        assert moved == [n for n, m in layers.items() if m.u_signs.shape[-1] >= 8]  # whole blocks
        assert moved
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in rows.items())
        model.load_state_dict(state)  # row order in, tile order kept
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        group_projections(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
