"""Latent KV cache: same tokens and logits as the standard cache, with the predicted memory."""

import contextlib
import io
import json
import logging
import warnings

import pytest
import torch
import transformers as tf
from conftest import tiny_model
from transformers import DynamicCache

from littlebit import LittleBitConfig, LittleBitError, load_compressed, pack_model, save_compressed
from littlebit.cli.main import main
from littlebit.core.convert import convert
from littlebit.runtime.kvcache import LatentKVCache, cache_argument
from littlebit.runtime.packed import PackedLittleBitLinear


@pytest.fixture(autouse=True)
def _quiet():
    # Tiny k/v layers cannot meet the bit target; the budget warning is expected noise here.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def packed(arch: str = "llama", bpw: float = 2.0, **config) -> torch.nn.Module:
    if config:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, **config)).eval()
    else:
        model = tiny_model(arch)
    convert(model, LittleBitConfig(bpw=bpw), progress=False)
    return pack_model(model)


def generate(model, ids, cache, new_tokens=16, **kw):
    with torch.no_grad():
        return model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            **{cache_argument(model): cache},
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )


def assert_same_generation(model, ids, new_tokens=16, tol=1e-5, **kw):
    ref = generate(model, ids, DynamicCache(), new_tokens, **kw)
    cache = LatentKVCache.for_model(model)
    out = generate(model, ids, cache, new_tokens, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=tol, atol=tol)
    return cache


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_generation_matches_dynamic_cache(arch):
    model = packed(arch)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    assert_same_generation(model, ids, new_tokens=24)


def test_rebuilt_states_equal_standard_cache_and_hooks_stay_inert():
    model = packed("llama")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = LatentKVCache.for_model(model)
    standard = DynamicCache()
    name = cache_argument(model)
    with torch.no_grad():
        model(ids, use_cache=True, **{name: cache})
        model(ids, use_cache=True, **{name: standard})  # hooks installed: must change nothing
    for i, layer in enumerate(cache.layers):
        k, v = layer.states()
        torch.testing.assert_close(k, standard.layers[i].keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, standard.layers[i].values, rtol=1e-5, atol=1e-6)


def test_cache_is_found_under_the_older_keyword_too():
    # Newer transformers rename ``past_key_values`` to ``cache`` (with a warning) before attention sees it.
    model = packed("llama")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    cache = LatentKVCache.for_model(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5
    assert cache.bytes_per_token_report()["cache_compression"] > 1


def test_left_padded_batch_keeps_each_rows_positions():
    model = packed("llama")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    assert_same_generation(model, ids, attention_mask=mask, pad_token_id=0)


def test_beam_search_and_factors_rebuilt_per_call():
    model = packed("llama")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    name = cache_argument(model)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, num_beams=3, **{name: DynamicCache()})
        cache = LatentKVCache.for_model(model, keep_factors=False)
        out = model.generate(ids, max_new_tokens=8, num_beams=3, **{name: cache})
    assert torch.equal(out, ref)
    assert cache.workspace_bytes() < 4 * 2 * 64 * 2  # no factors kept, only the cos/sin memo


def test_saved_and_loaded_model(tmp_path):
    model = packed("qwen2")  # k/v with bias
    save_compressed(model, tmp_path / "m", dtype=torch.float32)
    loaded = load_compressed(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    assert_same_generation(loaded, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_bytes_per_token_match_prediction(dtype):
    # MHA, d_kv = 4 * 32 = 128; rank 8 with the residual path: P * r = 16, so 8x smaller per layer.
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
    model = packed(bpw=0.5, **shape)
    model.to(dtype)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(6))
    cache = LatentKVCache.for_model(model)
    generate(model, ids, cache, new_tokens=5)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, PackedLittleBitLinear)
    width, d_kv, item = k_proj.n_paths * k_proj.rank, k_proj.out_features, dtype.itemsize
    for latent, standard in cache.layer_bytes_per_token():
        assert latent == 2 * width * item
        assert standard == 2 * d_kv * item
        assert standard / latent == d_kv / width == 8
    report = cache.bytes_per_token_report()
    assert report["cache_tokens"] == 2 * 15
    assert report["cache_bytes_per_token"] == 3 * 2 * width * item + 4  # + the shared int32 position
    assert report["cache_bytes_per_token_standard"] == 3 * 2 * d_kv * item


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3", "opt"])
def test_unsupported_architecture_is_refused(arch):
    model = packed(arch)
    with pytest.raises(LittleBitError, match="latent KV cache cannot serve"):
        LatentKVCache.for_model(model)


def test_model_without_littlebit_kv_is_refused():
    with pytest.raises(LittleBitError, match="no LittleBit k_proj/v_proj"):
        LatentKVCache.for_model(tiny_model("llama"))


def _word_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_cli_generate_latent_kv_json(tmp_path):
    save_compressed(packed("llama"), tmp_path / "m", _word_tokenizer(), dtype=torch.float32)
    runs = {}
    for flag in ([], ["--latent-kv"]):
        out = io.StringIO()
        args = ["generate", str(tmp_path / "m"), "--prompt", "w5 w9 w17", "--max-new-tokens", "6", "--json"]
        with contextlib.redirect_stdout(out):
            assert main([*args, "--device", "cpu", *flag]) == 0
        runs[bool(flag)] = json.loads(out.getvalue())
    latent = runs[True]
    assert latent["text"] == runs[False]["text"]
    assert latent["cache_bytes_per_token"] < latent["cache_bytes_per_token_standard"]
    assert "cache_bytes_per_token" not in runs[False]


@pytest.fixture
def cpu_decoding_backend(monkeypatch):
    """The project's CPU decoding backend, registered for one test only: the reference op unpacks every
    sign matrix at every step, ~50x slower on the default model."""
    from littlebit import op as ops

    monkeypatch.setattr(ops, "_BACKENDS", dict(ops._BACKENDS))
    kernels = pytest.importorskip("littlebit.kernels")
    kernels.register()


@pytest.mark.slow
def test_default_model_055_bpw_greedy_128_tokens(cpu_decoding_backend, default_model):
    model, tokenizer = default_model
    convert(model, LittleBitConfig(bpw=0.55), progress=False)
    pack_model(model)
    prompts = ["The capital of France is", "Once upon a time, a little robot", "def fibonacci(n):"]
    # One left-padded batch: the packed CPU op costs about the same per step for 1 or 3 rows.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # some transformers versions build the GGUF tokenizer without one
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kw = dict(attention_mask=batch.attention_mask, pad_token_id=tokenizer.pad_token_id, min_new_tokens=128)
    # fp32 through 30 layers and 128 steps, the standard K from the lookup-table backend and the latent
    # one from dense factors: the logits were seen to differ by up to 6e-5.
    cache = assert_same_generation(model, batch.input_ids, new_tokens=128, tol=2e-4, **kw)
    assert cache.bytes_per_token_report()["cache_compression"] > 1
