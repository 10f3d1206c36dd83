"""The user's own text: text files and Hugging Face datasets (``hf:NAME?...``) as perplexity test sets
and as training data. The hub is not reachable here: ``datasets.load_dataset`` is replaced by a fake
that streams rows and records how it was called."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import run_cli

from littlebit.config import LittleBitError
from littlebit.evaluation.data import check_test_set
from littlebit.evaluation.hub import hub_text, parse_hub_source
from littlebit.training.config import TrainConfig
from littlebit.training.data import training_sequences


class FakeHub:
    """Rows of one column per dataset name; counts the rows handed out."""

    def __init__(self, datasets: dict[str, list[dict]]):
        self.datasets, self.calls, self.rows_read = datasets, [], 0

    def load_dataset(self, name, config=None, split=None, **kwargs):
        self.calls.append({"name": name, "config": config, "split": split, **kwargs})
        if name not in self.datasets:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nor cannot be accessed.")
        return self._stream(self.datasets[name])

    def _stream(self, rows):
        for row in rows:
            self.rows_read += 1
            yield row


@pytest.fixture
def hub(monkeypatch):
    words = [{"text": " ".join(f"word{i}x{j}" for j in range(20)), "id": i} for i in range(500)]
    fake = FakeHub(
        {
            "org/notes": words,
            "org/numbers": [{"text": 7}],
            "org/empty": [],
            "org/sparse": [{"text": None}, {"text": "kept row"}, {"text": None}],
            "org/nulls": [{"text": None}],
        }
    )
    module = types.ModuleType("datasets")
    module.load_dataset = fake.load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return fake


def test_hub_sources_parse_and_bad_ones_are_refused_in_one_line():
    spec = parse_hub_source("hf:allenai/c4?config=en&split=validation")
    assert (spec.name, spec.config, spec.split, spec.column) == ("allenai/c4", "en", "validation", "text")
    assert parse_hub_source("hf:org/notes?column=body").column == "body"
    with pytest.raises(LittleBitError, match="at most once"):
        parse_hub_source("hf:org/x?split=a&split=b")
    for bad in ("hf:", "hf:a b", "hf:org/x?colour=red", "hf:org/x?split=", "hf:org/x?split"):
        with pytest.raises(LittleBitError) as err:
            parse_hub_source(bad)
        assert "\n" not in str(err.value)


def test_hub_text_streams_only_what_is_asked_and_runs_no_remote_code(hub):
    text = hub_text("hf:org/notes?config=c1", "train", max_tokens=250)  # 8 characters a token
    assert hub.rows_read < 20 and len(text) >= 2000 and text.startswith("word0x0")
    call = hub.calls[-1]
    assert (call["name"], call["config"], call["split"]) == ("org/notes", "c1", "train") and call["streaming"]
    assert not call.get("trust_remote_code")
    assert hub_text("hf:org/notes?split=test", "train").count("\n\n") == 499  # no bound: every row
    assert hub.calls[-1]["split"] == "test"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf:org/missing", "cannot load org/missing (train) from the Hugging Face hub: Dataset 'org/"),
        ("hf:org/notes?column=body", "has no column 'body' (it has text, id)"),
        ("hf:org/numbers", "holds int, not text"),
        ("hf:org/empty", "has no rows"),
        ("hf:org/nulls", "has no rows"),
    ],
)
def test_hub_failures_are_one_line(hub, source, message):
    with pytest.raises(LittleBitError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        hub_text(source, "train")
    assert "\n" not in str(err.value)


def test_empty_hub_rows_are_skipped(hub):
    assert hub_text("hf:org/sparse", "train") == "kept row"


def test_hub_text_without_the_datasets_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(LittleBitError, match=r"pip install 'littlebit\[eval\]'"):
        hub_text("hf:org/notes", "train")


def test_training_reads_a_hub_dataset_as_far_as_the_run_needs(hub, tiny_dir):
    from littlebit.hf.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    cfg = TrainConfig(seqlen=32, data_tokens=32 * 4)
    seqs = training_sequences("hf:org/notes", cfg, tok)
    assert seqs.shape[1] == 32 and seqs.shape[0] >= 4
    assert 0 < hub.rows_read < 500  # streamed, not the whole dataset
    assert tok.decode(seqs[0]).startswith("word0x0")


def test_test_sets_are_checked_before_anything_loads(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("text")
    for ok in ("wikitext2", "ptb", str(notes), str(tmp_path), "hf:org/notes?split=test"):
        check_test_set(ok)
    for bad in ("c5", str(tmp_path / "missing.txt"), "hf:org/x?colour=red", "", " ", "/dev/null"):
        with pytest.raises(LittleBitError):
            check_test_set(bad)


def test_a_file_that_is_not_text_is_refused_by_name(tmp_path):
    from littlebit.evaluation.data import test_set_text, training_text

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0xFE, 0xFF, 0x00, 0x81]) * 8)
    for read in (training_text, test_set_text):
        with pytest.raises(LittleBitError, match=f"{binary} is not UTF-8 text"):
            read(str(binary))


def test_eval_reports_perplexity_on_a_text_file_and_a_hub_dataset(hub, tiny_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"line {i} of the user's own notes" for i in range(200)))
    code, out, err = run_cli(
        capsys, "eval", str(tiny_dir), "--ppl", f"{notes},hf:org/notes?split=test", "--seqlen", "32",
        "--max-windows", "2",
    )  # fmt: skip
    assert code == 0, err
    assert f"{notes}: perplexity" in out and "over 2 of" in out
    # read only as far as two windows need: the split's size is not known, so no "of N"
    assert "hf:org/notes?split=test test: perplexity" in out and "over 2 windows" in out
    assert hub.calls[-1]["split"] == "test" and hub.rows_read < 500


def test_eval_refuses_an_unknown_test_set_in_one_line(tiny_dir, capsys):
    code, out, err = run_cli(capsys, "eval", str(tiny_dir), "--ppl", "c5")
    assert code == 2 and err.count("\n") == 1 and "unknown test set 'c5'" in err


def test_train_scores_the_held_out_text_it_is_given(tiny_dir, tmp_path, capsys):
    import json

    train_text, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train_text.write_text(" ".join(f"word{i % 300}" for i in range(4000)))
    held_out.write_text(" ".join(f"other{i % 200}" for i in range(2000)))
    argv = ["train", str(tiny_dir), "--bpw", "4", "--out", str(tmp_path / "m"), "--tokens", "1500"]
    argv += ["--data", str(train_text), "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32"]
    code, out, err = run_cli(capsys, *argv, "--eval-text", str(held_out), "--device", "cpu")
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["eval_text"] == str(held_out) and summary["eval_text_ppl_2x32"] > 1
    code, out, err = run_cli(capsys, *argv, "--eval-text", str(tmp_path / "missing.txt"))
    assert code == 2 and err.count("\n") == 1 and "unknown test set" in err
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    argv[argv.index(str(tmp_path / "m"))] = str(tmp_path / "m2")
    code, out, err = run_cli(capsys, *argv, "--eval-text", str(short), "--device", "cpu")
    assert code != 0 and "fewer than one window of --eval-seqlen 32" in err.splitlines()[-1]


def test_eval_reads_its_test_sets_before_loading_the_model(hub, capsys, monkeypatch):
    import littlebit.hf.models as models

    def no_model(*args, **kwargs):
        raise AssertionError("loaded the model before reading the test sets")

    monkeypatch.setattr(models, "load_model", no_model)
    code, out, err = run_cli(capsys, "eval", "--ppl", "hf:org/missing?split=test")
    assert code != 0 and err.count("\n") == 1 and "cannot load org/missing (test)" in err
