"""Streamed compression writes what the whole-model path writes, and resumes after a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import _ATTN, _COMMON, run_cli, tiny_model

import littlebit.hf.streaming as streaming
from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.convert import convert
from littlebit.hf.checkpoint import load_compressed, save_compressed
from littlebit.hf.models import load_model
from littlebit.hf.shards import SafetensorsCheckpoint
from littlebit.hf.streaming import compress_streamed, partial_dir

CONFIG = LittleBitConfig(bpw=1.0, seed=3)


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(1)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, **_ATTN, tie_word_embeddings=True)).eval()


SOURCES = {"llama": lambda: tiny_model("llama"), "phi3": lambda: tiny_model("phi3"), "tied": _tied_llama}


def _source(tmp_path, make=SOURCES["llama"]):
    """A bf16 checkpoint split into several shard files, as hub checkpoints are."""
    path = tmp_path / "source"
    make().to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def _in_memory(source, out, config=CONFIG, dtype=torch.bfloat16):
    model = load_model(str(source), torch.float32, "cpu")
    convert(model, config, compute_device="cpu", progress=False)
    save_compressed(model, out, config=config, dtype=dtype)


def _tensors(path):
    ckpt = SafetensorsCheckpoint(path)
    return {name: ckpt.read(name) for name in ckpt.entries}


def _assert_same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    config_a = json.loads((a / "config.json").read_text())
    config_b = json.loads((b / "config.json").read_text())
    assert config_a == config_b
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name  # the same files, byte for byte
    generation = [json.loads((d / "generation_config.json").read_text()) for d in (a, b)]
    assert generation[0] == generation[1]


def _logits(path):
    model = load_compressed(path)  # digests checked: no allow_unverified
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(SOURCES))
def test_streamed_equals_in_memory(tmp_path, arch):
    source = _source(tmp_path, SOURCES[arch])
    _in_memory(source, tmp_path / "whole")
    compress_streamed(source, tmp_path / "streamed", CONFIG, compute_device="cpu", progress=False)
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    assert torch.equal(_logits(tmp_path / "whole"), _logits(tmp_path / "streamed"))
    assert not partial_dir(tmp_path / "streamed").exists()


def test_streamed_equals_in_memory_with_the_randomized_svd(tmp_path, monkeypatch):
    import littlebit.core.init as init

    monkeypatch.setattr(init, "EXACT_SVD_MAX_DIM", 16)  # every tiny layer takes the sketch
    monkeypatch.setattr(init, "RANDOMIZED_MAX_RANK_FRACTION", 1.0)
    source = _source(tmp_path)
    _in_memory(source, tmp_path / "whole")
    torch.manual_seed(123)  # the sketch's own generator, not the global RNG, decides the result
    compress_streamed(source, tmp_path / "streamed", CONFIG, compute_device="cpu", progress=False)
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


def test_float32_output_and_one_path(tmp_path):
    config = LittleBitConfig(bpw=0.8, residual=False, kv_rank_multiplier=2.0)
    source = _source(tmp_path)
    _in_memory(source, tmp_path / "whole", config, torch.float32)
    compress_streamed(source, tmp_path / "streamed", config, dtype=torch.float32, compute_device="cpu")
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


def test_resume_after_a_crash_gives_the_same_output(tmp_path, monkeypatch):
    source = _source(tmp_path)
    compress_streamed(source, tmp_path / "straight", CONFIG, compute_device="cpu", progress=False)

    real = streaming._compress_block
    calls = []

    def crash_on_second_layer(*args, **kwargs):
        calls.append(args[1])  # the layer index
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_compress_block", crash_on_second_layer)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    work = partial_dir(out)
    assert not out.exists() and len(list(work.glob("model-*.safetensors"))) == 1
    (work / ".model-00002-of-00003.safetensors.tmp-999999").write_bytes(b"half a shard")

    calls.clear()
    compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    assert calls == [1]  # the finished layer is not redone
    assert not work.exists()
    _assert_same_checkpoint(tmp_path / "straight", out)
    _logits(out)


def _interrupted_after_one_layer(source, out, monkeypatch, hooks=None):
    """A compression stopped while its second layer is computed: one layer's shard is kept."""
    real = streaming._compress_block

    def crash_on_second_layer(*args, **kwargs):
        if args[1] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_compress_block", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=hooks)
    monkeypatch.setattr(streaming, "_compress_block", real)
    shards = sorted(partial_dir(out).glob("model-*.safetensors"))
    assert len(shards) == 1
    return shards[0]


def test_resume_refuses_another_model_at_the_same_path(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = tmp_path / "out"
    _interrupted_after_one_layer(source, out, monkeypatch)
    torch.manual_seed(7)  # other weights of the same shapes, written over the source
    other = tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, **_ATTN)).to(torch.bfloat16)
    other.save_pretrained(source, max_shard_size="40KB")
    with pytest.raises(LittleBitError, match="another model"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)


@pytest.mark.parametrize("damage", ["altered", "truncated"])
def test_a_damaged_partial_shard_is_computed_again(tmp_path, monkeypatch, damage):
    source = _source(tmp_path)
    compress_streamed(source, tmp_path / "straight", CONFIG, compute_device="cpu", progress=False)
    out = tmp_path / "out"
    shard = _interrupted_after_one_layer(source, out, monkeypatch)
    data = bytearray(shard.read_bytes())
    if damage == "altered":
        data[-3] ^= 0x40  # a bit of the last tensor's data: still a readable safetensors file
    else:
        del data[len(data) // 2 :]
    shard.write_bytes(bytes(data))
    compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    _assert_same_checkpoint(tmp_path / "straight", out)


def test_block_reconstruction_recomputes_a_damaged_shard_it_had_not_moved_past(tmp_path, monkeypatch):
    """A shard written, the states after it not: the resume fits that layer again, so its damaged file
    is computed again rather than refused."""
    from littlebit.training.streamed_blocks import STATES_NAME

    source = _source(tmp_path)
    hooks = _reconstruction()
    compress_streamed(
        source, tmp_path / "straight", CONFIG, compute_device="cpu", progress=False, hooks=hooks
    )
    out = tmp_path / "out"
    shard = _interrupted_after_one_layer(source, out, monkeypatch, hooks=_reconstruction())
    (partial_dir(out) / STATES_NAME).unlink()
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=_reconstruction())
    _assert_same_checkpoint(tmp_path / "straight", out)


def test_a_partial_without_digests_is_refused_with_what_to_do(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = tmp_path / "out"
    _interrupted_after_one_layer(source, out, monkeypatch)
    manifest = partial_dir(out) / streaming.MANIFEST_NAME
    record = json.loads(manifest.read_text())
    del record["source_fingerprint"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(LittleBitError, match="kept no digests of its layers: remove it"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)


def test_a_damaged_partial_shard_stops_block_reconstruction(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = tmp_path / "out"
    shard = _interrupted_after_one_layer(source, out, monkeypatch, hooks=_reconstruction())
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(LittleBitError, match="altered or damaged since it was written: remove"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=_reconstruction())


def _damage_states(path):
    """Flip one bit of the saved calibration states (in a tensor, the header left readable)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_states, lambda p: p.write_bytes(p.read_bytes()[:100])])
def test_damaged_calibration_states_stop_block_reconstruction(tmp_path, monkeypatch, damage):
    from littlebit.training.streamed_blocks import STATES_NAME

    source = _source(tmp_path)
    out = tmp_path / "out"
    _interrupted_after_one_layer(source, out, monkeypatch, hooks=_reconstruction())
    damage(partial_dir(out) / STATES_NAME)
    with pytest.raises(LittleBitError, match=f"{STATES_NAME} in .* altered or damaged .*: remove"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=_reconstruction())


def test_a_missing_shard_behind_the_calibration_states_stops_block_reconstruction(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = tmp_path / "out"
    shard = _interrupted_after_one_layer(source, out, monkeypatch, hooks=_reconstruction())
    shard.unlink()  # the states have moved past this layer: it cannot be fitted again from them
    with pytest.raises(LittleBitError, match=f"{shard.name} is missing from .*: remove"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=_reconstruction())


def test_failure_after_the_last_layer_still_resumes(tmp_path, monkeypatch):
    """A disk filling up while the side files are sealed leaves a partial that a rerun finishes."""
    source = _source(tmp_path)
    real = streaming.seal_side_files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "seal_side_files", disk_full)
    out = tmp_path / "out"
    with pytest.raises(LittleBitError, match="No space left"):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    assert not out.exists() and partial_dir(out).is_dir()
    monkeypatch.setattr(streaming, "seal_side_files", real)
    compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    assert not partial_dir(out).exists()
    _logits(out)


def test_the_current_directory_as_output(tmp_path, monkeypatch):
    source = _source(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    compress_streamed(source, ".", CONFIG, compute_device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "source"]  # no partial left beside
    _logits(tmp_path / "here")


def test_partial_work_of_other_settings_is_refused(tmp_path, monkeypatch):
    source = _source(tmp_path)
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    real = streaming._compress_block
    monkeypatch.setattr(streaming, "_compress_block", lambda *a, **k: (real(*a, **k), crash())[0])
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False)
    monkeypatch.setattr(streaming, "_compress_block", real)
    with pytest.raises(LittleBitError, match="other settings"):
        compress_streamed(source, out, LittleBitConfig(bpw=2.0), compute_device="cpu", progress=False)


def test_failure_before_any_layer_leaves_nothing(tmp_path):
    source = _source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(LittleBitError, match="no linear layers"):
        compress_streamed(source, out, LittleBitConfig(bpw=1.0, skip=["*"]), compute_device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_checkpoint_lacking_a_tensor_is_refused(tmp_path):
    source = tmp_path / "source"
    model = tiny_model("llama")
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    model.save_pretrained(source, state_dict=state)
    with pytest.raises(LittleBitError, match="lacks 1 tensor"):
        compress_streamed(source, tmp_path / "out", CONFIG, compute_device="cpu")
    assert not partial_dir(tmp_path / "out").exists()


def test_compress_command_streams_safetensors_and_can_load_whole(tiny_dir, tmp_path, capsys):
    argv = ["compress", str(tiny_dir), "--bpw", "1", "--seed", "3", "--device", "cpu", "--out"]
    code, out, err = run_cli(capsys, *argv, str(tmp_path / "a"))
    assert code == 0 and "streamed" in out, err
    code, out, _ = run_cli(capsys, *argv, str(tmp_path / "b"), "--in-memory")
    assert code == 0 and "streamed" not in out
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_synthetic_checkpoint_has_a_spectrum_and_streams(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from synthetic_checkpoint import write_checkpoint

    source = write_checkpoint(tmp_path / "source", "tiny", signal_rank=8, signal_share=0.8)
    w = SafetensorsCheckpoint(source).read("model.layers.1.mlp.up_proj.weight", torch.float32)
    s = torch.linalg.svdvals(w)
    assert s[:8].square().sum() > 0.6 * s.square().sum()  # white noise would give 8/64 of the energy
    _in_memory(source, tmp_path / "whole")
    compress_streamed(source, tmp_path / "streamed", CONFIG, compute_device="cpu", progress=False)
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


SEQUENCES = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _reconstruction(epochs=2):
    from littlebit.training.config import BlockConfig, LearningRates
    from littlebit.training.streamed_blocks import StreamedBlockReconstruction

    block = BlockConfig(sequences=8, epochs=epochs, batch_size=4)
    return StreamedBlockReconstruction(SEQUENCES, block, LearningRates(latent=1e-3), device="cpu")


def _layer_errors(source, compressed):
    """Relative error of each decoder layer's output against the original model's, on the calibration."""
    with torch.no_grad():
        ref = load_model(str(source), torch.float32, "cpu")(
            SEQUENCES, output_hidden_states=True
        ).hidden_states
        out = load_compressed(compressed)(SEQUENCES, output_hidden_states=True).hidden_states
    return [
        ((o.float() - r).square().sum() / r.square().sum()).item()
        for o, r in zip(out[1:], ref[1:], strict=True)
    ]


def test_streamed_reconstruction_fits_the_layers_to_the_teacher(tmp_path):
    source = _source(tmp_path)
    compress_streamed(source, tmp_path / "plain", CONFIG, compute_device="cpu", progress=False)
    hooks = _reconstruction(epochs=10)
    kw = dict(compute_device="cpu", progress=False, hooks=hooks)
    compress_streamed(source, tmp_path / "fitted", CONFIG, **kw)
    assert len(hooks.losses) == 2
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("plain", "fitted")]
    assert names[0] == names[1]  # the calibration states are not left in the checkpoint
    fitted, plain = _layer_errors(source, tmp_path / "fitted"), _layer_errors(source, tmp_path / "plain")
    assert all(f < 0.7 * p for f, p in zip(fitted, plain, strict=True)), (fitted, plain)


def test_streamed_reconstruction_resumes_after_the_last_written_layer(tmp_path, monkeypatch):
    source = _source(tmp_path)
    compress_streamed(
        source, tmp_path / "straight", CONFIG, compute_device="cpu", progress=False, hooks=_reconstruction()
    )
    hooks = _reconstruction()
    real = type(hooks).student
    monkeypatch.setattr(
        type(hooks),
        "student",
        lambda self, i, b: (_ for _ in ()).throw(KeyboardInterrupt) if i == 1 else real(self, i, b),
    )
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=hooks)
    monkeypatch.setattr(type(hooks), "student", real)
    hooks = _reconstruction()
    compress_streamed(source, out, CONFIG, compute_device="cpu", progress=False, hooks=hooks)
    assert len(hooks.losses) == 1  # only the second layer was fitted again
    _assert_same_checkpoint(tmp_path / "straight", out)


def test_compress_command_reconstructs(tiny_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    out = tmp_path / "out"
    argv = ["compress", str(tiny_dir), "--bpw", "1", "--device", "cpu", "--out", str(out), "--reconstruct"]
    argv += ["--calibration", str(text), "--block-sequences", "4", "--seqlen", "16", "--block-epochs", "1"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0 and "block reconstruction error" in stdout, err
    assert torch.isfinite(_logits(out)).all()


@pytest.mark.parametrize(
    ("calibration", "extra", "message"),
    [
        ("", ["--reconstruct"], "source is empty"),
        ("wikitext2:bogus", ["--reconstruct"], "unknown split"),
        ("wikitext2:valid", [], "add --reconstruct"),
    ],
)
def test_bad_calibration_text_is_refused_before_loading(
    tiny_dir, tmp_path, capsys, calibration, extra, message
):
    argv = [
        "compress",
        str(tiny_dir),
        "--bpw",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--calibration",
        calibration,
    ]
    code, _, err = run_cli(capsys, *argv, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "needs a safetensors checkpoint"), (["{tiny}", "--in-memory"], "drop --in-memory")],
)
def test_reconstruct_refuses_what_it_cannot_stream(tiny_dir, tmp_path, capsys, extra, message):
    extra = [str(tiny_dir) if a == "{tiny}" else a for a in extra]
    code, _, err = run_cli(
        capsys, "compress", *extra, "--bpw", "1", "--reconstruct", "--out", str(tmp_path / "o")
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
