import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import littlebit
from littlebit import LittleBitConfig, LittleBitError, load_compressed, save_compressed
from littlebit.core.convert import convert
from littlebit.hf.report import checkpoint_info
from littlebit.op import littlebit_linear_reference
from littlebit.runtime.packed import PackedLittleBitLinear


def round_scales_to_fp16(model):
    for m in model.modules():
        if isinstance(m, littlebit.LittleBitLinear):
            for name in "hlg":
                getattr(m, name).data = getattr(m, name).data.half().float()


@pytest.fixture
def saved(tmp_path):
    """A tiny compressed Llama saved in fp32, plus the training-form logits before saving."""
    model = tiny_model("llama")
    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    round_scales_to_fp16(model)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
    out = tmp_path / "ckpt"
    save_compressed(model, out, dtype=torch.float32)
    return out, x, ref


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt", "gemma2"])
def test_packed_logits_equal_training_logits(tmp_path, arch):
    model = tiny_model(arch)
    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    round_scales_to_fp16(model)
    x = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        ref = model(x).logits
    save_compressed(model, tmp_path / "m", dtype=torch.float32)
    loaded = load_compressed(tmp_path / "m")
    assert any(isinstance(m, PackedLittleBitLinear) for m in loaded.modules())
    with torch.no_grad():
        out = loaded(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_from_pretrained_and_byte_stable_round_trip(saved, tmp_path):
    out, x, ref = saved
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)
    again = tmp_path / "again"
    model.save_pretrained(again)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # transformers alone writes the config and the tensors with their digests; only save_compressed
    # seals the files beside them (their digests, and the config digest over those)
    resaved, first = (json.loads((d / "config.json").read_text()) for d in (again, out))
    assert resaved["quantization_config"].pop("file_digests") is None
    assert set(first["quantization_config"].pop("file_digests")) == {"generation_config.json"}
    for cfg in (resaved, first):
        cfg["quantization_config"].pop("config_digest")
    assert resaved == first
    load_compressed(again)
    generated = model.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_from_pretrained_in_a_fresh_process_needs_no_remote_code(saved):
    out, _, _ = saved
    code = (
        "import littlebit, transformers; "
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}); "
        "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "PackedLittleBitLinear"


def test_packed_layer_holds_only_packed_tensors(saved):
    out, _, _ = saved
    model = load_compressed(out)
    layer = model.model.layers[0].mlp.down_proj
    assert not list(layer.parameters())
    kinds = {name: b.dtype for name, b in layer.named_buffers()}
    assert kinds["u_signs"] == torch.int32 and kinds["v_signs"] == torch.int32
    assert kinds["h"] == torch.float16
    x = torch.randn(4, layer.in_features)
    args = (layer.u_signs, layer.v_signs, layer.h, layer.l, layer.g)
    torch.testing.assert_close(layer(x), littlebit_linear_reference(x, *args))


def test_info_reports_sizes(saved):
    out, _, _ = saved
    info = checkpoint_info(out)
    assert {"bpw_linear", "bpw_total", "n_params", "layers", "bytes_on_disk", "bytes_in_memory"} <= set(info)
    assert info["bytes_in_memory"] == pytest.approx(info["bytes_expected"], rel=0.05)
    header = 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert info["bytes_on_disk"] == pytest.approx(info["bytes_expected"] + header, rel=0.01)
    assert {"name", "shape", "rank", "bpw"} <= set(info["layers"][0])


def _flip_byte(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "damaged or truncated"),
        ("flip", "damaged"),
        ("version", "format version"),
        ("shape", "altered after saving"),
        ("missing", "no .safetensors|not provide|missing|cannot load"),
    ],
)
def test_damaged_checkpoints_are_refused(saved, damage, message):
    out, _, _ = saved
    weights, config = out / "model.safetensors", out / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "flip":
        _flip_byte(weights, 100)
    else:
        cfg = json.loads(config.read_text())
        q = cfg["quantization_config"]
        if damage == "version":
            q["format_version"] = 99
        elif damage == "shape":
            name = next(iter(q["layers"]))
            q["layers"][name]["rank"] += 8
        else:
            os.remove(weights)
        config.write_text(json.dumps(cfg))
    with pytest.raises(LittleBitError, match=message):
        load_compressed(out)


def test_save_refuses_non_empty_directory_and_leaves_nothing(tmp_path):
    model = tiny_model("llama")
    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(LittleBitError, match="not empty"):
        save_compressed(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_requested_dtype_applies_to_uncompressed_weights(tmp_path):
    model = tiny_model("llama")
    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    save_compressed(model, tmp_path / "bf16")  # uncompressed weights saved in bfloat16
    loaded = load_compressed(tmp_path / "bf16", dtype=torch.float32)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.h.dtype == torch.float16 and layer.u_signs.dtype == torch.int32
    assert load_compressed(tmp_path / "bf16").model.embed_tokens.weight.dtype == torch.bfloat16


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, message",
    [
        ("tokenizer", "tokenizer.json was altered after saving"),
        ("generation", "generation_config.json was altered after saving"),
        ("delete", "tokenizer_config.json is missing"),
        ("add", "special_tokens_map.json was added after saving"),
        ("add-template", "additional_chat_templates/default.jinja was added after saving"),
        ("unseal", "config.json was altered after saving"),
    ],
)
def test_tokenizer_and_generation_defaults_are_covered(compressed, tmp_path, caplog, change, message):
    out = tmp_path / "copy"
    shutil.copytree(compressed, out)
    sealed = json.loads((out / "config.json").read_text())["quantization_config"]["file_digests"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(sealed)
    if change == "tokenizer":
        tok = out / "tokenizer.json"
        tok.write_text(tok.read_text().replace('"<|im_start|>"', '"<|im_begin|>"', 1))
    elif change == "generation":
        _edit_json(out / "generation_config.json", temperature=0.1)
    elif change == "delete":
        (out / "tokenizer_config.json").unlink()
    elif change == "add":
        (out / "special_tokens_map.json").write_text('{"eos_token": "<|im_start|>"}')
    elif change == "add-template":  # the tokenizer reads its named chat templates from this folder
        (out / "additional_chat_templates").mkdir()
        (out / "additional_chat_templates" / "default.jinja").write_text("{{ 'another model' }}")
    else:
        cfg = json.loads((out / "config.json").read_text())
        del cfg["quantization_config"]["file_digests"]
        (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LittleBitError, match=message):
        load_compressed(out)
    with pytest.raises(LittleBitError, match=message):
        checkpoint_info(out)
    if change != "unseal":  # an edited chat template may be on purpose: loading it is asked for by name
        with caplog.at_level(logging.WARNING, logger="littlebit.hf.verification"):
            load_compressed(out, allow_unverified=True)
        assert re.search(message, caplog.text)


def test_files_that_do_not_change_the_output_may_be_added(compressed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(compressed, out)
    (out / "README.md").write_text("# my compressed model\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    load_compressed(out)


def test_transformers_loads_a_snapshot_without_its_tokenizer_yet(compressed, tmp_path):
    # a hub snapshot holds the files fetched so far: the model before its tokenizer
    out = tmp_path / "snapshot"
    shutil.copytree(compressed, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    AutoModelForCausalLM.from_pretrained(out)
    _edit_json(out / "generation_config.json", temperature=0.1)
    with pytest.raises(LittleBitError, match="generation_config.json was altered"):
        AutoModelForCausalLM.from_pretrained(out)
