"""Resuming training: from every checkpoint, past damaged ones, after killed writes; bad settings."""

from __future__ import annotations

import errno
import json
import shutil
import types
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.training import checkpoints as train_state
from littlebit.training.checkpoints import list_checkpoints, load_checkpoint, remove_stale, save_checkpoint
from littlebit.training.config import BlockConfig, LearningRates, TrainConfig
from littlebit.training.optim import LATENT, NORM, SCALE, param_groups
from littlebit.training.trainer import train

LB = LittleBitConfig(bpw=4.0, init="itq")
TOKENS = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))


def _config(**overrides) -> TrainConfig:
    # Scale and norm rates far above the default move RMS values across half-octave bucket edges
    # within a few steps, so the saved optimizer groups differ from a bucketing of the trained values.
    kw = dict(
        steps=10,
        seqlen=32,
        batch_size=4,
        blocks=BlockConfig(sequences=8, epochs=1, batch_size=4),
        calib_sequences=4,
        save_every=2,
        keep_checkpoints=0,
        lrs=LearningRates(scale=0.1, norm=0.1),
    )
    return TrainConfig(**{**kw, **overrides})


def _train(work: Path, config: TrainConfig, **kw) -> dict[str, torch.Tensor]:
    """The final student weights; one thread, since the comparisons are bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(tiny_model("llama", seed=0), TOKENS, LB, config, work, progress=False, **kw)
        return {n: t.detach().clone() for n, t in res.student.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src, dst / src.name)
    shutil.copy(src.with_suffix(".safetensors"), dst / src.with_suffix(".safetensors").name)
    shutil.copy(src.parent / "train_log.jsonl", dst / "train_log.jsonl")
    return dst / src.name


def _groups_regrouped(path: Path, lrs: LearningRates) -> bool:
    """Whether bucketing the checkpoint's trained values afresh gives other groups than it saved."""
    tensors, meta, _ = load_checkpoint(path.parent, path)
    saved = meta["optimizer"]["param_groups"]
    by_kind = {
        kind: [n for g in saved if g["kind"] == kind for n in g["params"]] for kind in (LATENT, SCALE, NORM)
    }
    kinds = {kind: [tensors[f"model.{n}"] for n in names] for kind, names in by_kind.items()}
    name_of = {
        id(t): n
        for names, ts in zip(by_kind.values(), kinds.values(), strict=True)
        for n, t in zip(names, ts, strict=True)
    }
    fresh = {(g["kind"], frozenset(name_of[id(t)] for t in g["params"])) for g in param_groups(kinds, lrs)}
    return fresh != {(g["kind"], frozenset(g["params"])) for g in saved}


def test_resume_from_every_checkpoint_matches_an_unbroken_run(tmp_path):
    cfg = _config()
    plain = _train(tmp_path / "plain", cfg)
    checkpoints = list_checkpoints(tmp_path / "plain")
    names = [p.stem for p in checkpoints]
    assert names[:3] == ["state-blocks-000001", "state-blocks-000002", "state-global-000000"]
    assert names[-1] == "state-global-000010" and len(names) == 8
    # The run covers the failing case: some tensor's RMS crossed a bucket edge after the groups were made.
    assert any(_groups_regrouped(p, cfg.lrs) for p in checkpoints if "global" in p.name)
    for path in checkpoints:
        start = _copy_checkpoint(path, tmp_path / path.stem)
        _assert_same(plain, _train(start.parent, cfg, resume_from=start))
        log = [json.loads(line) for line in (start.parent / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if r["phase"] == "global"] == list(range(1, 11)), path.name


def _flip_latent_signs(path: Path) -> None:
    """Flip the sign bits of 64 latent values in place, leaving a well-formed safetensors file."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + size])["model.model.layers.0.self_attn.q_proj.u"]
    assert entry["dtype"] == "F32"
    first = 8 + size + entry["data_offsets"][0]
    for i in range(64):
        data[first + 4 * i + 3] ^= 0x80  # the top byte of a little-endian float32 holds its sign
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["position"] += 4
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_damaged_checkpoint_is_refused_naming_the_previous_good_one(tmp_path, damage):
    cfg = _config(steps=6, keep_checkpoints=2)
    plain = _train(tmp_path / "plain", cfg)
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "plain", work)
    previous, newest = list_checkpoints(work)  # the older ones are gone
    assert (previous.stem, newest.stem) == ("state-global-000004", "state-global-000006")
    if damage == "json":
        _edit_json(newest)
    else:
        (_flip_latent_signs if damage == "flip" else _truncate)(newest.with_suffix(".safetensors"))

    with pytest.raises(LittleBitError) as refused:
        _train(work, cfg, resume=True)
    message = str(refused.value)
    assert "\n" not in message and "damaged" in message
    assert f"--resume-from {previous}" in message
    if damage == "flip":
        assert "q_proj.u does not match its digest" in message
        _assert_same(plain, _train(work, cfg, resume_from=previous))
        # The damaged checkpoint was replaced by a good one: a plain resume works again.
        _assert_same(plain, _train(work, cfg, resume=True))
    else:
        _edit_json(previous)
        with pytest.raises(LittleBitError, match="no earlier good checkpoint"):
            _train(work, cfg, resume=True)


def test_stale_files_of_killed_writes_are_removed(tmp_path):
    cfg = _config(steps=2, blocks=BlockConfig(sequences=0))
    _train(tmp_path, cfg)
    stale = [
        "state-global-000004.safetensors.tmp",
        "state-global-000004.json.tmp",
        "state-global-000004.safetensors",
    ]
    for name in stale:
        (tmp_path / name).write_bytes(b"partial")
    assert sorted(remove_stale(tmp_path)) == sorted(stale) and not remove_stale(tmp_path)
    for name in stale:
        (tmp_path / name).write_bytes(b"partial")
    _train(tmp_path, cfg, resume=True)
    assert not any((tmp_path / name).exists() for name in stale)
    assert [p.stem for p in list_checkpoints(tmp_path)] == ["state-global-000000", "state-global-000002"]


def test_failed_write_removes_its_file_and_says_why(tmp_path, monkeypatch):
    def no_space(tensors, filename):
        Path(filename).write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    save_checkpoint(tmp_path, "global-000001", {"w": torch.ones(3)}, {"step": 1})
    monkeypatch.setattr(train_state, "save_file", no_space)
    with pytest.raises(LittleBitError, match=r"cannot write checkpoint .*: No space left on device$"):
        save_checkpoint(tmp_path, "global-000002", {"w": torch.zeros(3)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-global-000001.json",
        "state-global-000001.safetensors",
    ]
    assert load_checkpoint(tmp_path).meta["step"] == 1


BAD_CONFIGS = [
    {"lrs": {"scale": -1.0}},
    {"lrs": {"latent": 0.0}},
    {"lrs": {"norm": float("nan")}},
    {"warmup_frac": 1.0},
    {"warmup_frac": -0.1},
    {"seqlen": 1},
    {"steps": -1},
    {"eval_every": -1},
    {"save_every": -1},
    {"save_interval_s": -1.0},
    {"save_interval_s": float("nan")},
    {"eval_windows": 0},
    {"eval_seqlen": 1},
    {"calib_sequences": -1},
    {"keep_checkpoints": -1},
    {"latent_rms": -0.02},
    {"act_power": -1.0},
    {"grad_power": float("nan")},
    {"blocks": {"epochs": -1}},
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=lambda d: next(iter(d)))
def test_bad_settings_are_refused_in_one_line(bad):
    with pytest.raises(LittleBitError) as refused:
        TrainConfig(**bad)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "flag",
    ["--lr=-1", "--latent-lr=0", "--norm-lr=nan", "--warmup=1", "--seqlen=1", "--steps=-1", "--save-every=-1",
     "--save-interval=-1", "--eval-windows=-1", "--calib-sequences=-1", "--block-sequences=-1",
     "--keep-checkpoints=-1"],
)  # fmt: skip
def test_bad_arguments_fail_before_loading_anything(flag, capsys, monkeypatch):
    from littlebit.cli import main as cli
    from littlebit.hf import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(["train", "--bpw", "1", "--out", "/nonexistent/x", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("littlebit: error:") and "\n" not in err


class _Tokenizer:
    def __call__(self, text: str, **kw):
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


def test_train_command_deletes_the_state_unless_kept(tmp_path, monkeypatch):
    from littlebit.evaluation import perplexity as evaluation
    from littlebit.hf import checkpoint as serialization
    from littlebit.hf import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_model("llama", seed=0))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: _Tokenizer())
    monkeypatch.setattr(
        evaluation, "tokenize_eval", lambda *a: (_ for _ in ()).throw(LittleBitError("offline"))
    )
    saved = []
    monkeypatch.setattr(serialization, "save_compressed", lambda student, out, **k: saved.append(Path(out)))
    (tmp_path / "data.txt").write_text("a little text to train on, repeated. " * 40)

    def run(out: str, *extra: str) -> int:
        from littlebit.cli import main as cli

        args = ["train", "--bpw", "4", "--out", str(tmp_path / out), "--data", str(tmp_path / "data.txt")]
        args += ["--steps", "2", "--seqlen", "16", "--block-sequences", "0", "--calib-sequences", "2"]
        return cli.main([*args, "--save-every", "1", "--device", "cpu", "--eval-windows", "1", *extra])

    assert run("a") == 0 and saved == [tmp_path / "a"]
    kept = ["train_curves.png", "train_log.jsonl"] if find_spec("matplotlib") else ["train_log.jsonl"]
    assert sorted(p.name for p in (tmp_path / "a-train").iterdir()) == kept
    assert run("b", "--keep-state", "--keep-checkpoints", "0") == 0
    first = tmp_path / "b-train" / "state-global-000001.json"
    assert len(list_checkpoints(tmp_path / "b-train")) == 3
    assert run("c", "--work-dir", str(tmp_path / "b-train"), "--resume-from", str(first)) == 0
    assert saved[-1] == tmp_path / "c" and not list_checkpoints(tmp_path / "b-train")
