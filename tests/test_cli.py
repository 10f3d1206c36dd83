import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

DATA = "wikitext-2-raw"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small folder laid out like shared/data."""
    root = tmp_path_factory.mktemp("data")
    (root / DATA).mkdir()
    (root / "ptb").mkdir()
    text = " = Title = \n \n The quick brown fox jumps over the lazy dog . \n" * 200
    (root / DATA / "wiki.test.raw").write_text(text)
    (root / "ptb" / "ptb.test.txt").write_text(" the cat sat on the mat \n" * 300)
    return root


def test_compress_info_eval_generate(compressed, data_dir, capsys):
    code, out, _ = run_cli(capsys, "info", str(compressed), "--json")
    info = json.loads(out)
    assert code == 0 and info["bytes_in_memory"] > 0 and len(info["layers"]) == 14
    assert {"bpw_linear", "bpw_total", "n_params", "bytes_on_disk", "bytes_expected"} <= set(info)
    code, out, _ = run_cli(
        capsys,
        "eval",
        str(compressed),
        "--ppl",
        "wikitext2,ptb",
        "--seqlen",
        "64",
        "--max-windows",
        "2",
        "--data-dir",
        str(data_dir),
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and set(result) == {"wikitext2", "ptb"} and all(v > 1 for v in result.values())
    code, out, _ = run_cli(
        capsys, "generate", str(compressed), "--prompt", "Hello", "--max-new-tokens", "3", "--json"
    )
    assert code == 0 and "text" in json.loads(out)


def test_eval_baselines(tiny_dir, data_dir, capsys):
    for kind, budget in (("svd", ["--bpw", "1.0"]), ("onebit", [])):
        code, out, _ = run_cli(
            capsys,
            "eval",
            str(tiny_dir),
            "--baseline",
            kind,
            *budget,
            "--seqlen",
            "64",
            "--max-windows",
            "1",
            "--data-dir",
            str(data_dir),
            "--json",
        )
        assert code == 0 and json.loads(out)["wikitext2"] > 1


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compress", "{tiny}", "--bpw", "0", "--out", "{out}"], "(0, 16)"),
        (["compress", "{tiny}", "--bpw", "16", "--out", "{out}"], "(0, 16)"),
        (["compress", "{tiny}", "--bpw", "-1", "--out", "{out}"], "(0, 16)"),
        (["compress", "{tiny}", "--bpw", "abc", "--out", "{out}"], "not a number"),
        (["compress", "{missing}", "--bpw", "1", "--out", "{out}"], "model not found"),
        (["compress", "{tiny}", "--bpw", "1", "--out", "{out}", "--skip", "*"], "no linear layers"),
        (["compress", "{tiny}", "--bpw", "1", "--out", "{busy}"], "not empty"),
        (["eval", "{tiny}", "--data-dir", "{empty}"], "data file not found"),
        (["eval", "{tiny}", "--ppl", "c5"], "unknown test set"),
        (["info", "{tiny}"], "not a LittleBit checkpoint"),
        (["info", "{missing}"], "no config.json"),
        (["train", "{tiny}", "--bpw", "1", "--out", "{busy}"], "not empty"),
        (["train", "{tiny}", "--bpw", "1", "--out", "{busy}/x/sub"], "is a file"),
        (["train", "{tiny}", "--bpw", "1", "--out", "{out}", "--work-dir", "{out}/w"], "outside the"),
        (["train", "{tiny}", "--bpw", "1", "--out", "{out}", "--work-dir", "{out}"], "outside the"),
        (["train", "{tiny}", "--bpw", "1", "--out", "{out}", "--nproc", "0"], "--nproc must be >= 1"),
        (["compress", "{resized}", "--bpw", "1", "--out", "{out}"], "its config.json gives"),
        (["compress", "{resized}", "--bpw", "1", "--out", "{out}", "--in-memory"], "cannot load model"),
        (["compress", "{headless}", "--bpw", "1", "--out", "{out}"], "cannot load model"),
        (["eval", "{headless}", "--ppl", "wikitext2"], "cannot load model"),
        (["eval", "{pickled}", "--ppl", "wikitext2"], "only pickled weights"),
        (["eval", "{tiny}", "--baseline", "onebit", "--bpw", "2"], "add --baseline svd"),
        (["compress", "{holed}", "--bpw", "1", "--out", "{out}", "--in-memory"], "its weights lack"),
        (["eval", "{holed}", "--ppl", "wikitext2"], "its weights lack model.layers.0.mlp.down_proj.weight"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tiny_dir, tmp_path, capsys, argv, fragment):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    for name, changes in (("resized", {"hidden_size": 32}), ("headless", {"num_attention_heads": 0})):
        shutil.copytree(tiny_dir, tmp_path / name)  # a config.json that disagrees with the weights
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **changes}))
    weights = load_file(tiny_dir / "model.safetensors")
    shutil.copytree(tiny_dir, tmp_path / "pickled")  # the same weights as a pickle
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pickled" / "pytorch_model.bin")
    shutil.copytree(tiny_dir, tmp_path / "holed")  # one weight missing from the file
    hole = {k: v for k, v in weights.items() if "layers.0.mlp.down_proj" not in k}
    save_file(hole, tmp_path / "holed" / "model.safetensors", metadata={"format": "pt"})
    paths = {
        "tiny": tiny_dir,
        "out": tmp_path / "out",
        "busy": busy,
        "missing": tmp_path / "no-such-model",
        "empty": tmp_path / "empty",
        "resized": tmp_path / "resized",
        "headless": tmp_path / "headless",
        "pickled": tmp_path / "pickled",
        "holed": tmp_path / "holed",
    }
    argv = [a.format(**paths) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in busy.iterdir()) == ["x"]


def test_damaged_checkpoint_from_the_command_line(compressed, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for unloaded in ([], ["--no-load"]):  # without loading, the header's sizes still tell
        res = subprocess.run(
            [sys.executable, "-m", "littlebit.cli", "info", str(broken), *unloaded],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 2
        assert "Traceback" not in res.stderr and res.stderr.strip().startswith("littlebit: error:")


def test_info_counts_the_files_a_load_reads(compressed, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(compressed, copy)
    shutil.copy(copy / "model.safetensors", copy / "model-2.safetensors")  # a stray copy beside it
    reports = []
    for directory in (compressed, copy):
        code, out, err = run_cli(capsys, "info", str(directory), "--no-load", "--json")
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0] == reports[1]


@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "{dir}", "--ppl", "wikitext2", "--seqlen", "4096"),
        ("generate", "{dir}", "--prompt", "hello", "--max-new-tokens", "4096", "--device", "cpu"),
    ],
)
def test_positions_past_the_context_are_refused(compressed, capsys, argv):
    # the tiny model was trained (configured) for 2048 positions
    code, _, err = run_cli(capsys, *(a.format(dir=compressed) for a in argv))
    assert code == 2 and "past the model's 2,048-token context" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "argv",
    [
        ("train", "{dir}", "--bpw", "1", "--tokens", "40000", "--seqlen", "4096", "--out", "{out}"),
        ("train", "{dir}", "--bpw", "1", "--tokens", "40000", "--eval-seqlen", "4096", "--out", "{out}"),
        ("generate-data", "{dir}", "--tokens", "100", "--length", "4096", "--out", "{out}"),
    ],
)
def test_lengths_past_the_teachers_context_are_refused_before_it_loads(tiny_dir, tmp_path, capsys, argv):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *(a.format(dir=tiny_dir, out=out) for a in argv))
    assert code == 2 and err.strip() == err.strip().splitlines()[-1]  # one line, no loading bar
    assert "past the model's 2,048-token context" in err and not out.exists()


def test_context_of_a_loaded_model_is_checked_too():
    from types import SimpleNamespace

    from littlebit.cli.common import check_context
    from littlebit.config import LittleBitError

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(to_dict=lambda: config))

    check_context(model(max_position_embeddings=16), 16, "16 tokens")
    with pytest.raises(LittleBitError, match="17 positions, past the model.s 16-token context"):
        check_context(model(max_position_embeddings=16), 17, "17 tokens")
    scaled = model(max_position_embeddings=16, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    check_context(scaled, 64, "64 tokens of a model whose RoPE is scaled 4x")
    with pytest.raises(LittleBitError, match="past the model's 64-token context"):
        check_context(scaled, 65, "65 tokens")
    with pytest.raises(LittleBitError, match="past the model's 64-token context"):  # transformers 5's name
        check_context(model(max_position_embeddings=16, rope_parameters={"factor": 4.0}), 65, "65 tokens")
    check_context(model(), 10**6, "a model that states no context")
    check_context(SimpleNamespace(), 10**6, "an object without a config")
    check_context(None, 10**6, "the default model, before it loads")


@pytest.mark.parametrize(
    ("flag", "value"), [("data", "wikitext2"), ("eval_text", "hf:wikitext"), ("calibration", "ptb:valid")]
)
def test_text_that_may_come_from_the_hub_goes_offline_without_a_route(monkeypatch, flag, value):
    import argparse

    import littlebit.cli.main as main

    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # unset for the call, restored after the test
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "")
    monkeypatch.setattr(main, "_resolves", lambda host, timeout: False)
    main._offline_if_hub_unreachable(argparse.Namespace(**{flag: value}))
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"


def test_lm_eval_with_a_hub_model_goes_offline_without_a_route(monkeypatch):
    import littlebit.cli.main as main

    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "")
    monkeypatch.setattr(main, "_resolves", lambda host, timeout: False)
    args = main.build_parser().parse_args(
        ["lm-eval", "--model", "hf", "--model_args", "pretrained=org/m,dtype=bf16"]
    )
    assert args.model == "org/m"
    main._offline_if_hub_unreachable(args)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
