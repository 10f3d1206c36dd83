"""Compiled decoder layers in the global phase: the step's own causal mask, plain code for
evaluations, and a model handed back uncompiled."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model

from littlebit.training.blockwise import decoder_layers
from littlebit.training.compiled import causal_mask, compile_layers, eager_layers, uncompile_layers


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_steps_causal_mask_gives_the_models_own_logits(attention):
    model = tiny_model("llama", seed=3)
    model.config._attn_implementation = attention
    seqlen = 24
    ids = torch.randint(0, model.config.vocab_size, (3, seqlen), generator=torch.Generator().manual_seed(5))
    mask = causal_mask(model, seqlen, ids.device)
    assert mask.shape == (1, 1, seqlen, seqlen)
    with torch.no_grad():
        own = model(ids, use_cache=False).logits
        given = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(given, own, rtol=1e-5, atol=1e-5)


def test_no_mask_for_attention_it_cannot_describe():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    assert causal_mask(model, 8, torch.device("cpu")) is None
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4  # a window shorter than the sequence: not a plain causal mask
    assert causal_mask(model, 8, torch.device("cpu")) is None
    assert causal_mask(model, 4, torch.device("cpu")) is not None


def test_eager_layers_restores_the_compiled_code_and_uncompile_drops_it():
    model = tiny_model("llama")
    layers = decoder_layers(model)
    compile_layers(layers)  # lazy: nothing compiles until a call
    compiled = [layer._compiled_call_impl for layer in layers]
    assert all(c is not None for c in compiled)
    with eager_layers(layers):
        assert all(layer._compiled_call_impl is None for layer in layers)
    assert [layer._compiled_call_impl for layer in layers] == compiled
    uncompile_layers(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_compiled_steps_match_recorded_eager_steps(tmp_path, watch_recorded_steps, monkeypatch):
    from test_training import _tiny_global_run

    import littlebit.runtime.step_graph as step_graph
    import littlebit.training.trainer as trainer_module

    made = watch_recorded_steps(trainer_module)
    fallbacks = []
    monkeypatch.setattr(step_graph.log, "warning", lambda *args, **kw: fallbacks.append(args))
    eval_ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2)).cuda()
    run = {"device": "cuda", "cuda_graphs": True, "eval_every": 3, "eval_seqlen": 32, "eval_windows": 2}
    _, eager, log_e = _tiny_global_run(tmp_path / "e", compile=False, eval_ids=eval_ids, **run)
    _, compiled, log_c = _tiny_global_run(tmp_path / "c", compile=True, eval_ids=eval_ids, **run)
    assert not fallbacks, fallbacks  # every step and every evaluation window was recorded
    assert made and all(step.active for step in made)
    for re_, rc in zip(log_e, log_c, strict=True):
        assert math.isclose(re_["loss"], rc["loss"], rel_tol=2e-2), (re_, rc)
    assert compiled.use_compile and not eager.use_compile
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(compiled.student))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_compiled_block_steps_match_recorded_eager_ones(tmp_path, watch_recorded_steps, monkeypatch):
    from test_training import _tiny_global_run

    import littlebit.runtime.step_graph as step_graph
    import littlebit.training.blockwise as blockwise
    from littlebit.training.config import BlockConfig

    made = watch_recorded_steps(blockwise)
    fallbacks = []
    monkeypatch.setattr(step_graph.log, "warning", lambda *args, **kw: fallbacks.append(args))
    run = {
        "device": "cuda",
        "cuda_graphs": True,
        "steps": 0,
        "blocks": BlockConfig(sequences=8, epochs=3, batch_size=2),
    }
    _, eager, _ = _tiny_global_run(tmp_path / "e", compile=False, **run)
    _, compiled, _ = _tiny_global_run(tmp_path / "c", compile=True, **run)
    assert not fallbacks, fallbacks
    assert made and all(step.active for step in made)
    # Each layer's error after its block steps. Weights are not compared: Adam normalises each update,
    # so the fused kernels' rounding moves latents whose gradients are near zero by up to a step size.
    errors_e, errors_c = _block_errors(tmp_path / "e"), _block_errors(tmp_path / "c")
    assert len(errors_e) == len(decoder_layers(eager.student)) and len(errors_c) == len(errors_e)
    for ee, ec in zip(errors_e, errors_c, strict=True):
        assert math.isclose(ee, ec, rel_tol=2e-2), (errors_e, errors_c)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(compiled.student))


def _block_errors(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "w" / "train_log.jsonl").read_text().splitlines()]
    return [r["rel_err"] for r in records if r.get("phase") == "blocks"]
