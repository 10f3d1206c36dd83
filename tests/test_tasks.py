"""lm-eval tasks: ``littlebit eval --tasks`` and ``littlebit lm-eval`` on a tiny LittleBit directory,
with PIQA questions written here (the offline task definitions shipped with littlebit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("How do I dry wet shoes?", "Stuff them with newspaper.", "Put them in the freezer.", 0),
    ("To keep bread fresh longer,", "leave it in the sun.", "store it in a sealed bag.", 1),
    ("How can I open a stuck jar lid?", "Run the lid under hot water.", "Paint the lid blue.", 0),
    ("To cool a hot drink quickly,", "add ice cubes.", "add boiling water.", 0),
    ("How do I make a paper airplane fly farther?", "Crumple it up.", "Fold the wings evenly.", 1),
    ("To remove a splinter,", "use clean tweezers.", "use a hammer.", 0),
    ("How do I keep a candle from dripping?", "Chill it before lighting.", "Light both ends.", 0),
    ("To find a leak in a bike tube,", "sing to it.", "submerge it in water and look for bubbles.", 1),
]


@pytest.fixture(scope="module")
def piqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "piqa").mkdir()
    with open(root / "piqa" / "valid.jsonl", "w", encoding="utf-8") as f:
        for goal, sol1, sol2, _ in QUESTIONS:
            f.write(json.dumps({"goal": goal, "sol1": sol1, "sol2": sol2}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{q[3]}\n" for q in QUESTIONS))
    return root


def test_eval_tasks_json(compressed, piqa_data, capsys):
    code, out, err = run_cli(
        capsys, "eval", str(compressed), "--tasks", "piqa", "--limit", "8", "--json",
        "--data-dir", str(piqa_data), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["perplexity"] == {}  # --tasks alone computes no perplexity
    piqa = result["tasks"]["piqa"]
    assert piqa["samples"] == 8
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= piqa[metric] <= 1.0
        assert piqa[f"{metric}_stderr"] > 0


def test_lm_eval_cli_loads_littlebit_dir(compressed, piqa_data, capsys):
    from littlebit.evaluation.tasks import TASKS_DIR

    code, out, err = run_cli(
        capsys, "lm-eval", "--model", "hf", "--model_args", f"pretrained={compressed}",
        "--tasks", "piqa_local", "--include_path", str(TASKS_DIR),
        "--metadata", json.dumps({"data_dir": str(piqa_data)}), "--limit", "4", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "piqa_local" in out and "acc_norm" in out


@pytest.mark.parametrize("case", ["unknown task", "output under a file", "missing model folder"])
def test_lm_eval_cli_refuses_bad_input_in_one_line(compressed, tmp_path, capsys, case):
    (tmp_path / "file").write_text("")
    model = tmp_path / "no_such_model" if case == "missing model folder" else compressed
    argv = ["lm-eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--limit", "2"]
    argv += ["--device", "cpu", "--tasks", "no_such_task" if case == "unknown task" else "piqa_local"]
    if case == "output under a file":
        argv += ["--output_path", str(tmp_path / "file" / "results")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    expected = {"unknown task": "Tasks not found", "output under a file": "is a file"}
    assert expected.get(case, "no such folder") in err.strip().splitlines()[-1]


def test_missing_task_data_is_one_line(compressed, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", str(compressed), "--tasks", "piqa", "--data-dir", str(tmp_path))
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "no local data for piqa" in err and f"{tmp_path}/piqa/" in err


def test_missing_lm_eval_names_the_extra(compressed, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run_cli(capsys, "eval", str(compressed), "--tasks", "piqa")
    assert code == 2
    assert "pip install 'littlebit[eval]'" in err and err.strip().count("\n") == 0


def test_parser_does_not_import_lm_eval():
    probe = (
        "import sys; from littlebit.cli.main import build_parser; build_parser(); "
        "print('lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_unknown_task_fails_before_the_model_loads(compressed, monkeypatch, capsys):
    import littlebit.hf.checkpoint

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the task names were checked")

    monkeypatch.setattr(littlebit.hf.checkpoint, "load_compressed", no_load)
    code, _, err = run_cli(capsys, "eval", str(compressed), "--tasks", "no_such_task_xyz")
    assert code == 2
    assert "no_such_task_xyz" in err and err.strip().count("\n") == 0


def test_a_missing_model_is_named_before_the_tasks_are_looked_up(tmp_path, monkeypatch, capsys):
    import littlebit.evaluation.tasks

    def no_lookup(*args, **kwargs):
        raise AssertionError("the tasks were looked up before the model path was checked")

    monkeypatch.setattr(littlebit.evaluation.tasks, "load_tasks", no_lookup)
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "absent"), "--tasks", "piqa")
    assert code == 2 and "model not found" in err


@pytest.mark.parametrize(
    "questions, labels, fragment",
    [
        ("{not json\n", "0\n", "line 1 is not a PIQA question"),
        ('{"goal": "a", "sol1": "b"}\n', "0\n", "line 1 is not a PIQA question"),
        ('{"goal": "a", "sol1": "b", "sol2": "c"}\n', "7\n", "label 1 is '7'"),
        ('{"goal": "a", "sol1": "b", "sol2": "c"}\n', "0\n1\n", "1 questions but 2 labels"),
    ],
)
def test_malformed_local_task_data_names_the_file(compressed, tmp_path, capsys, questions, labels, fragment):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(questions)
    (tmp_path / "piqa" / "valid-labels.lst").write_text(labels)
    argv = ["eval", str(compressed), "--tasks", "piqa", "--limit", "1", "--data-dir", str(tmp_path)]
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("littlebit:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and "no local data" not in lines[0]
