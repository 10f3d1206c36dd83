"""Figures: training curves from a JSONL log, quality against BPW from benchmark results, the
``littlebit plot`` command, and the curves ``littlebit train`` leaves in its work dir."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_model

from littlebit.config import LittleBitError
from littlebit.evaluation import plots

pytest.importorskip("matplotlib")

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC


def _synthetic_log(path: Path, steps: int = 40, scale: float = 1.0) -> Path:
    records = [
        {"phase": "blocks", "block": b, "rel_err": 0.1 / (b + 1), "tokens": 64 * (b + 1)} for b in range(2)
    ]
    for step in range(1, steps + 1):
        tokens = 128 + 256 * step
        records.append(
            {
                "phase": "global",
                "step": step,
                "tokens": tokens,
                "loss": scale / step,
                "kl": 0.5 / step,
                "hidden": 0.1,
                "tokens_per_s": 1000.0 + step,
            }
        )
        if step % 10 == 0:
            records.append({"phase": "eval", "step": step, "tokens": tokens, "ppl": 500.0 * scale / step})
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"phase": "glo', encoding="utf-8")  # a last line cut short by a kill
    return path


def test_training_curves_of_several_logs(tmp_path):
    a = _synthetic_log(tmp_path / "a" / "train_log.jsonl")
    b = _synthetic_log(tmp_path / "b" / "train_log.jsonl", scale=2.0)
    out = plots.plot_training([a, b], tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and _is_png(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_plot_command_on_a_training_log(tmp_path, capsys):
    log = _synthetic_log(tmp_path / "run" / "train_log.jsonl")
    code, out, _ = run_cli(capsys, "plot", str(log), "--out", str(tmp_path / "t.png"))
    assert code == 0 and _is_png(tmp_path / "t.png") and out.strip() == str(tmp_path / "t.png")


@pytest.mark.parametrize("files", [["qat.json"], ["ptq.json"], ["qat.json", "ptq.json"]])
def test_plot_command_on_benchmark_results(tmp_path, capsys, files):
    out = tmp_path / "sub" / "q.png"
    code, _, err = run_cli(capsys, "plot", *[str(RESULTS / f) for f in files], "--out", str(out))
    assert code == 0, err
    assert _is_png(out)


def test_benchmark_results_are_read_as_quality_points():
    kind, points = plots.detect(RESULTS / "ptq.json")
    assert kind == plots.QUALITY and [p["series"] for p in points if p["fp"]] == ["fp"]
    kind, points = plots.detect(RESULTS / "qat.json")
    assert kind == plots.QUALITY and all(p["bpw"] < 1.1 and p["ppl"] > 1 for p in points)
    assert len({p["tokens"] for p in points}) == 1  # runs on another token budget are left out


def _qat_run(variant: str, bpw: float, tokens: int, headline: float, **config) -> dict:
    return {
        "variant": variant,
        "bpw_target": bpw,
        "tokens": tokens,
        "headline": headline,
        "littlebit_config": config,
    }


def test_held_out_quality_against_training_tokens(tmp_path, capsys):
    runs = [
        _qat_run("default", 1.0, 409600, 3.1, attention_bpw_factor=1.5),
        _qat_run("seed1", 1.0, 409600, 3.3, attention_bpw_factor=1.5),
        _qat_run("default", 1.0, 1638400, 2.4, attention_bpw_factor=1.5),
        _qat_run("single-path", 1.0, 1638400, 2.5, attention_bpw_factor=1.5),
        _qat_run("lrs-1.5x-seed1", 1.0, 1638400, 2.6, residual=True),
        {"variant": "default", "bpw_target": 1.0, "tokens": 1638400, "wikitext2_ppl": 60.0},  # no headline
    ]
    results = tmp_path / "qat.json"
    results.write_text(json.dumps(runs))
    points = plots.compute_points(results)
    assert [p["series"] for p in points] == ["1 BPW, attention at 1.5x"] * 3 + [
        "1 BPW, attention at 1.5x, single-path",
        "1 BPW, two paths, lrs-1.5x",
    ]
    # named variants lose their names: single-path joins the default's curve, lrs-1.5x is left out
    points = plots.compute_points(results, ["default", "single-path"])
    assert {p["series"] for p in points} == {"1 BPW, attention at 1.5x"} and len(points) == 4
    out = tmp_path / "compute.png"
    code, printed, err = run_cli(capsys, "plot", "--kind", "compute", str(results), "--out", str(out))
    assert code == 0 and _is_png(out) and printed.strip() == str(out), err
    code, _, err = run_cli(
        capsys,
        "plot",
        "--kind",
        "compute",
        "--variants",
        "other",
        str(results),
        "--out",
        str(tmp_path / "x.png"),
    )
    assert code == 2 and err.count("\n") == 1 and "other" in err and not (tmp_path / "x.png").exists()
    code, _, err = run_cli(
        capsys, "plot", "--variants", "default", str(results), "--out", str(tmp_path / "x.png")
    )
    assert code == 2 and "--kind compute" in err and err.count("\n") == 1


def test_held_out_quality_needs_scored_runs(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "plot", "--kind", "compute", str(RESULTS / "ptq.json"), "--out", str(tmp_path / "x.png")
    )
    assert code == 2 and err.count("\n") == 1 and "held-out" in err and not (tmp_path / "x.png").exists()
    kind, _ = plots.detect(RESULTS / "qat_16m_tokens_h100.json")
    assert kind == plots.QUALITY  # auto never picks the compute figure


@pytest.mark.parametrize(
    "content", ["not json at all\n", '{"a": 1}\n', "[1, 2, 3]\n", '{"phase": "other"}\n', ""]
)
def test_unrecognised_file_is_one_line_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, _, err = run_cli(capsys, "plot", str(bad), "--out", str(tmp_path / "x.png"))
    assert code == 2 and err.startswith("littlebit: error:") and err.count("\n") == 1
    assert "bad.json" in err and not (tmp_path / "x.png").exists()


def test_unreadable_and_mixed_files_are_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plot", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "missing.jsonl" in err
    log = _synthetic_log(tmp_path / "train_log.jsonl")
    code, _, err = run_cli(
        capsys, "plot", str(log), str(RESULTS / "qat.json"), "--out", str(tmp_path / "x.png")
    )
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "plot", str(log), "--kind", "quality", "--out", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, message in ((tmp_path, "is a directory"), (a_file / "x.png", f"{a_file} is a file")):
        code, _, err = run_cli(capsys, "plot", str(log), "--out", str(out))
        assert code == 2 and err.count("\n") == 1 and message in err


def test_records_with_values_of_the_wrong_kind_are_left_out(tmp_path, capsys):
    log = tmp_path / "odd.jsonl"
    rows = [
        {"phase": "global", "tokens": 10, "loss": "abc", "run": [1, 2]},
        {"phase": "global", "tokens": 20, "loss": 1.0, "tokens_per_s": [3]},
        {"phase": "eval", "ppl": 5.0},
        {"phase": "eval", "ppl": 4.0, "tokens": 20},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(capsys, "plot", str(log), "--out", str(tmp_path / "odd.png"))
    assert code == 0 and (tmp_path / "odd.png").is_file() and not err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    log = _synthetic_log(tmp_path / "train_log.jsonl")
    with pytest.raises(LittleBitError, match=r"pip install 'littlebit\[plot\]'"):
        plots.plot_training([log], tmp_path / "x.png")
    from littlebit.training.log import write_curves

    assert write_curves(log) is None  # a training run only warns
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "littlebit[plot]" in caplog.records[0].getMessage()


def test_plot_help_does_not_import_matplotlib():
    import subprocess

    code = (
        "import sys; from littlebit.cli import main; main.build_parser(); print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Tokenizer:
    def __call__(self, text: str, **kw):
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


def test_train_command_leaves_its_curves_in_the_work_dir(tmp_path, monkeypatch):
    from littlebit.cli import main as cli
    from littlebit.evaluation import perplexity as evaluation
    from littlebit.hf import checkpoint as serialization
    from littlebit.hf import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_model("llama", seed=0))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: _Tokenizer())
    monkeypatch.setattr(
        evaluation, "tokenize_eval", lambda *a: (_ for _ in ()).throw(LittleBitError("offline"))
    )
    monkeypatch.setattr(serialization, "save_compressed", lambda student, out, **k: None)
    (tmp_path / "data.txt").write_text("a little text to train on, repeated. " * 40)
    args = ["train", "--bpw", "4", "--out", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt")]
    args += ["--steps", "2", "--seqlen", "16", "--block-sequences", "0", "--calib-sequences", "2"]
    assert cli.main([*args, "--save-every", "1", "--device", "cpu"]) == 0
    work = tmp_path / "m-train"
    assert sorted(p.name for p in work.iterdir()) == ["train_curves.png", "train_log.jsonl"]
    assert _is_png(work / "train_curves.png")


@pytest.mark.parametrize(
    "content",
    [
        '[{"bpw_linear": 1.0, "wikitext2_ppl": 10.0, "tokens": [1]}]',  # a budget that is no number
        '[{"bpw_linear": 1.0, "wikitext2_ppl": 10.0, "tokens": ' + "9" * 400 + "}]",  # past float's range
    ],
)
def test_odd_values_in_result_files_are_left_out(tmp_path, capsys, content):
    results = tmp_path / "odd.json"
    results.write_text(content)
    code, _, err = run_cli(capsys, "plot", str(results), "--out", str(tmp_path / "odd.png"))
    assert code == 0 and _is_png(tmp_path / "odd.png"), err


@pytest.mark.parametrize("content", ["[" * 100000 + "]" * 100000, "[" + "9" * 5000 + "]"])
def test_json_too_deep_or_long_to_read_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, _, err = run_cli(capsys, "plot", str(bad), "--out", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "neither" in err


def test_values_too_extreme_to_draw_are_one_line_and_leave_nothing(tmp_path, capsys):
    log = tmp_path / "extreme.jsonl"
    rows = [{"phase": "global", "tokens": 1e-308, "loss": 1e308, "tokens_per_s": 1e308}]
    rows += [
        {"phase": "global", "tokens": 1e308, "loss": 1e-308},
        {"phase": "eval", "tokens": 1e308, "ppl": 1e308},
    ]
    rows += [{"phase": "blocks", "tokens": 1e308}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "new" / "sub" / "x.png"
    code, _, err = run_cli(capsys, "plot", str(log), "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "cannot draw" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extreme.jsonl"]  # no directory left behind


def test_the_output_is_never_an_input_or_a_special_file(tmp_path, capsys):
    log = _synthetic_log(tmp_path / "train_log.jsonl")
    before = log.read_bytes()
    code, _, err = run_cli(capsys, "plot", str(log), "--out", str(log))
    assert code == 2 and "one of the files to plot" in err and log.read_bytes() == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "plot", str(log), "--out", str(fifo))
    assert code == 2 and "not a regular file" in err and fifo.is_fifo()
    long = tmp_path / ("a" * 250 + ".png")  # a legal name; the temporary must not be longer
    code, _, err = run_cli(capsys, "plot", str(log), "--out", str(long))
    assert code == 0 and _is_png(long), err


def test_a_byte_order_mark_is_read_and_other_formats_are_refused(tmp_path, capsys):
    results = tmp_path / "bom.json"
    results.write_bytes(b"\xef\xbb\xbf" + (RESULTS / "ptq.json").read_bytes())
    code, _, err = run_cli(capsys, "plot", str(results), "--out", str(tmp_path / "q.png"))
    assert code == 0 and _is_png(tmp_path / "q.png"), err
    code, _, err = run_cli(capsys, "plot", str(results), "--out", str(tmp_path / "q.jpg"))
    assert code == 2 and "*.png" in err and err.count("\n") == 1 and not (tmp_path / "q.jpg").exists()
