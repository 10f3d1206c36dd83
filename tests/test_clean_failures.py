"""Failures end in one line and leave nothing behind; outputs get the user's normal permissions."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from conftest import run_cli, tiny_model

from littlebit import LittleBitConfig, LittleBitError, load_compressed, save_compressed
from littlebit.core.convert import convert
from littlebit.hf.checkpoint import checkpoint_kind


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    convert(model, LittleBitConfig(bpw=2.0), progress=False)
    save_compressed(model, tmp_path / "ckpt", dtype=torch.float32)
    return tmp_path / "ckpt"


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_outputs_get_normal_permissions(saved):
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~mask
    for f in saved.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_failed_save_leaves_nothing_not_even_parents(tmp_path, monkeypatch):
    model = tiny_model("llama")
    convert(model, LittleBitConfig(bpw=2.0), progress=False)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(LittleBitError, match="No space left on device"):
        save_compressed(model, tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, saved):
    stale = tmp_path / ".again.tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    save_compressed(load_compressed(saved), tmp_path / "again")
    assert not stale.exists() and (tmp_path / "again" / "config.json").is_file()


def test_checkpoint_without_digests_needs_an_explicit_override(saved):
    _edit_config(saved, lambda cfg: cfg["quantization_config"].pop("tensor_digests"))
    with pytest.raises(LittleBitError, match="no digests"):
        load_compressed(saved)
    assert load_compressed(saved, allow_unverified=True) is not None


def test_an_unverified_load_still_compares_the_config_digest_it_has(saved, caplog):
    def unhook(cfg):
        cfg["quantization_config"].pop("tensor_digests")
        cfg["rms_norm_eps"] = 0.5  # another model under the same config digest

    _edit_config(saved, unhook)
    with pytest.raises(LittleBitError, match="config digest mismatch"):
        load_compressed(saved, allow_unverified=True)
    _edit_config(saved, lambda cfg: cfg.update(rms_norm_eps=1e-6))
    assert load_compressed(saved, allow_unverified=True) is not None
    assert "unverified, as asked: it carries no tensor digests" in caplog.text


@pytest.mark.parametrize("digests", [["a", "b"], "abc", {"x": 1}])
def test_tensor_digests_of_the_wrong_kind_are_an_altered_config(saved, digests):
    _edit_config(saved, lambda cfg: cfg["quantization_config"].update(tensor_digests=digests))
    with pytest.raises(LittleBitError, match="altered after saving"):
        load_compressed(saved)


def test_unverified_load_still_checks_the_tensors_against_the_layers(saved):
    def drop_layer(cfg):
        q = cfg["quantization_config"]
        q.pop("config_digest")
        del q["layers"][next(iter(q["layers"]))]

    _edit_config(saved, drop_layer)
    with pytest.raises(LittleBitError, match="does not have"):
        load_compressed(saved, allow_unverified=True)


def test_lost_quantization_config_is_recognised(saved):
    _edit_config(saved, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(LittleBitError, match="holds LittleBit tensors"):
        checkpoint_kind(saved)


@pytest.mark.parametrize(
    "edit, argv, fragment",
    [
        (lambda q: q.update(quant_method="gptq"), ["eval", "{dir}"], "quantized with 'gptq'"),
        (lambda q: q.update(scale_dtype="Tensor"), ["info", "{dir}"], "altered after saving"),
        (None, ["eval", "{dir}", "--seqlen", "0"], "at least 2"),
        (None, ["eval", "{dir}", "--max-windows", "-1"], "at least 1"),
        (None, ["compress", "{dir}", "--bpw", "1", "--out", "{out}"], "already a LittleBit checkpoint"),
        (None, ["compress", "--bpw", "1", "--device", "nosuch", "--out", "{out}"], "unknown device"),
        (None, ["eval", "{dir}", "--ppl", ","], "names no test set"),
        (None, ["eval", "{dir}", "--limit", "5"], "go with --tasks"),
        (None, ["eval", "{dir}", "--num-fewshot", "0"], "go with --tasks"),
        (None, ["eval", "{dir}", "--baseline", "svd"], "compressed already"),
        (None, ["generate", "{dir}", "--prompt", " "], "prompt is empty"),
        (None, ["train", "--bpw", "1", "--out", "{out}", "--seqlen", "4"], "--seqlen must be at least 8"),
    ],
)
def test_command_line_refusals(compressed, tmp_path, capsys, edit, argv, fragment):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(compressed, directory)
    if edit is not None:
        _edit_config(directory, lambda cfg: edit(cfg["quantization_config"]))
    argv = [a.format(dir=directory, out=tmp_path / "out") for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and fragment in _one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "in-memory"])
def test_full_disk_during_compress_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch, whole):
    import safetensors.torch
    import transformers

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if whole:
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    else:  # the streamed path writes each layer's shard through safetensors
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    argv = ["compress", str(tiny_dir), "--bpw", "2", "--out", str(tmp_path / "x" / "y")]
    code, _, err = run_cli(capsys, *argv, *(["--in-memory"] if whole else []))
    assert code == 2 and "No space left on device" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_closed_output_pipe_stops_quietly(compressed):
    """``littlebit info DIR | head -1``: the reader closes the pipe; no error line, status 141."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "littlebit.cli", "info", str(compressed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the command writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "error" not in err.lower() and "Traceback" not in err


@pytest.mark.parametrize("unverified", [False, True])
def test_generate_checks_the_tokenizer_before_reading_it(compressed, tmp_path, capsys, unverified):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(compressed, directory)
    (directory / "tokenizer_config.json").write_text("[]")  # valid JSON that no tokenizer reads
    argv = ["generate", str(directory), "--prompt", "hello"] + ["--allow-unverified"] * unverified
    code, _, err = run_cli(capsys, *argv)
    fragment = "has no usable tokenizer" if unverified else "tokenizer_config.json was altered after saving"
    assert code == 2 and fragment in err.splitlines()[-1] and "Traceback" not in err


def test_generate_refuses_a_prompt_that_is_not_utf8(compressed, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, _, err = run_cli(capsys, "generate", str(compressed), "--prompt", prompt)
    assert code == 2 and "not valid UTF-8" in _one_error_line(err)


def test_an_unreadable_config_is_one_line(compressed, capsys, monkeypatch):
    from pathlib import Path

    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = run_cli(capsys, "info", str(compressed), "--no-load")
    assert code == 2 and "config.json: Permission denied" in _one_error_line(err)


def test_an_unreadable_tokenizer_file_is_bad_input(compressed, capsys, monkeypatch):
    import builtins

    real = builtins.open

    def denied(file, *args, **kwargs):
        if str(file).endswith("tokenizer.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    code, _, err = run_cli(capsys, "generate", str(compressed), "--prompt", "hello")
    assert code == 2 and "Permission denied" in _one_error_line(err) and "tokenizer.json" in err


def test_info_without_loading_refuses_what_a_load_refuses(saved, capsys):
    from littlebit.hf.verification import config_digest

    weights = saved / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact + b"\0" * 8)  # bytes past the data the header describes
    code, _, err = run_cli(capsys, "info", str(saved), "--no-load")
    assert code == 2 and "bytes past the data" in _one_error_line(err)
    weights.write_bytes(intact)

    def other_rank(cfg):  # a config that gives one layer another rank, with its digest made anew
        q = cfg["quantization_config"]
        spec = next(iter(q["layers"].values()))
        spec["rank"] = spec["rank"] * 2
        q["config_digest"] = config_digest(cfg)

    _edit_config(saved, other_rank)
    code, _, err = run_cli(capsys, "info", str(saved), "--no-load")
    assert code == 2 and "the config or the weights were altered" in _one_error_line(err)


def test_an_unverified_finding_is_said_once(compressed, tmp_path, capsys, caplog):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(compressed, directory)
    config = directory / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 64}))
    code, _, err = run_cli(capsys, "info", str(directory), "--allow-unverified")
    assert code == 0, err
    said = [r for r in caplog.records if "loading anyway" in r.getMessage()]
    assert len(said) == 1 and "tokenizer_config.json was altered" in said[0].getMessage()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes"),
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB"),
    ],
)
def test_running_out_of_memory_is_one_line_with_what_to_lower(compressed, capsys, monkeypatch, error):
    from littlebit.cli import info

    def allocate(args):
        raise error

    monkeypatch.setattr(info, "run", allocate)
    code, _, err = run_cli(capsys, "info", str(compressed))
    assert code == 1 and err.startswith("littlebit: error: out of memory") and "--batch-size" in err
    assert err.count("\n") == 1
