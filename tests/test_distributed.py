"""Sharded training (FSDP2) on two CPU processes over gloo: it trains as one process does on the same
global batch, and a run killed on every rank resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import littlebit
from littlebit.config import LittleBitError
from littlebit.training.config import BlockConfig, TrainConfig
from littlebit.training.distributed import RankBatches, check_config
from littlebit.training.sharded_checkpoints import (
    finish_sharded,
    list_sharded,
    load_sharded_meta,
    partial_path,
    remove_partial,
)
from littlebit.training.stream import Batches, pack_sequences

WORKER = Path(__file__).with_name("distributed_worker.py")
RANKS = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not built in",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, *args: str, script: Path = WORKER) -> list[int]:
    """Run ``script`` (the worker) on RANKS processes with torchrun's environment; their exit codes."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    env["WORLD_SIZE"] = str(RANKS)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, whatever GPUs the machine has
    env["PYTHONPATH"] = os.pathsep.join([str(Path(littlebit.__file__).parents[1]), env.get("PYTHONPATH", "")])
    procs, logs = [], []
    try:
        for rank in range(RANKS):
            logs.append(open(tmp / f"{name}-rank{rank}.log", "w"))  # noqa: SIM115
            cmd = [sys.executable, str(script), *args]
            env_r = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(cmd, env=env_r, stdout=logs[-1], stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:  # a hung or surviving rank never outlives the test
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return [p.returncode for p in procs]


def _log(work: Path) -> list[dict]:
    lines = (work / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "global"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """An unbroken two-process run; its work dir (final weights in ``final.safetensors`` beside it)."""
    tmp = tmp_path_factory.mktemp("sharded")
    codes = _launch(tmp, "plain", str(tmp / "work"), str(tmp / "final.safetensors"))
    assert codes == [0] * RANKS, (tmp / "plain-rank0.log").read_text()[-3000:]
    return tmp / "work"


def test_two_processes_train_like_one_on_the_same_global_batch(sharded_run, tmp_path, monkeypatch):
    import distributed_worker as worker

    from littlebit.training import log as train_log

    monkeypatch.setattr(train_log, "write_curves", lambda path: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = littlebit.train(
            worker.tiny_model("llama", seed=0), worker.tokens(), worker.LB, worker.config(), tmp_path / "one",
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    one, two = _log(tmp_path / "one"), _log(sharded_run)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))  # logged once
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "kl", "hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    sharded = load_file(str(sharded_run.parent / "final.safetensors"))
    plain = single.student.state_dict()
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.allclose(sharded[name], tensor, rtol=1e-4, atol=1e-6), name
    # Trained tensors did move, so the comparison is not between two untouched initialisations.
    latent = "model.layers.0.self_attn.q_proj.u"
    assert [p.name for p in list_sharded(sharded_run)][-1] == "dcp-global-000006"
    assert not torch.equal(plain[latent], _initial(tmp_path / "one", latent))


def _initial(work: Path, name: str) -> torch.Tensor:
    from littlebit.training.checkpoints import list_checkpoints

    first = list_checkpoints(work)[0]  # keep_checkpoints=0: the step-0 checkpoint is still there
    return load_file(str(first.with_suffix(".safetensors")))[f"model.{name}"]


def test_every_rank_killed_mid_run_resumes_to_the_same_weights(sharded_run, tmp_path):
    work, out = tmp_path / "work", tmp_path / "final.safetensors"
    # Killed right after the optimizer step of global step 3: steps 1-3 ran, step 2 is the newest save.
    assert _launch(tmp_path, "killed", str(work), str(out), "--kill-at", "3") == [-signal.SIGKILL] * RANKS
    assert [p.name for p in list_sharded(work)][-1] == "dcp-global-000002" and not out.exists()
    assert _launch(tmp_path, "resumed", str(work), str(out), "--resume") == [0] * RANKS
    resumed, plain = load_file(str(out)), load_file(str(sharded_run.parent / "final.safetensors"))
    assert resumed.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(resumed[name], tensor), name
    assert [r["step"] for r in _log(work)] == list(range(1, 7))


def test_each_rank_takes_its_share_of_the_single_process_batch():
    seqs = pack_sequences(torch.arange(400), 4)
    whole = Batches(seqs, 6, seed=2)
    shares = [RankBatches(Batches(seqs, 6, seed=2), r, 3) for r in range(3)]
    for _ in range(5):
        assert torch.equal(torch.cat([s.next() for s in shares]), whole.next())
    assert {s.position for s in shares} == {whole.position}


@pytest.mark.parametrize(
    "config, world, message",
    [
        (TrainConfig(), 2, "block reconstruction runs in a single process"),
        (TrainConfig(batch_size=3, blocks=BlockConfig(sequences=0)), 2, "multiple of the 2 processes"),
    ],
)
def test_what_a_sharded_run_cannot_do_is_refused_in_one_line(config, world, message):
    with pytest.raises(LittleBitError, match=message) as refused:
        check_config(config, world)
    assert "\n" not in str(refused.value)
    check_config(TrainConfig(batch_size=4, blocks=BlockConfig(epochs=0)), 2)


def _fake_checkpoint(work: Path, tag: str, step: int) -> Path:
    tmp = partial_path(work, tag)
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (tmp / ".metadata").write_bytes(b"metadata")
    return finish_sharded(work, tag, {"step": step}, keep=0)


def test_sharded_checkpoints_are_checked_and_killed_writes_removed(tmp_path):
    first, second = (
        _fake_checkpoint(tmp_path, "global-000002", 2),
        _fake_checkpoint(tmp_path, "global-000004", 4),
    )
    meta, path = load_sharded_meta(tmp_path)
    assert (meta["step"], path) == (4, second)
    data = bytearray((second / "__0_0.distcp").read_bytes())
    data[100] ^= 1
    (second / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(LittleBitError) as refused:
        load_sharded_meta(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "__0_0.distcp does not match its digest" in message
    assert f"--resume-from {first}" in message
    assert load_sharded_meta(tmp_path, first)[0]["step"] == 2
    partial_path(tmp_path, "global-000006").mkdir()  # a write killed before its rename
    (tmp_path / "dcp-global-000008").mkdir()  # a removal killed after the JSON went
    assert remove_partial(tmp_path) == ["dcp-global-000006.partial", "dcp-global-000008"]
    assert [p.name for p in list_sharded(tmp_path)] == ["dcp-global-000002", "dcp-global-000004"]


def test_train_command_refuses_what_several_processes_cannot_do_before_loading(capsys, monkeypatch):
    from littlebit.cli import main as cli
    from littlebit.hf import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for extra in (["--nproc", "2"], ["--nproc", "2", "--block-sequences", "0", "--batch-size", "3"]):
        assert cli.main(["train", "--bpw", "1", "--out", "/nonexistent/x", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("littlebit: error:") and "\n" not in err
        assert ("block reconstruction" if len(extra) == 2 else "multiple of the 2 processes") in err


def test_sharded_benchmark_builds_on_meta_and_each_rank_holds_half(tmp_path):
    """``benchmarks/fsdp_step.py`` builds teacher and student on the meta device and fills them shard
    by shard after sharding (how a 70B run fits): each of two ranks holds half of every model's
    parameters, and the steps train."""
    script = Path(__file__).parents[1] / "benchmarks" / "fsdp_step.py"
    out = tmp_path / "step.json"
    args = ("--tiny", "--steps", "3", "--seqlen", "32", "--batch-size", "1", "--out", str(out))
    codes = _launch(tmp_path, "bench", *args, script=script)
    assert codes == [0] * RANKS, (tmp_path / "bench-rank0.log").read_text()[-3000:]
    record = json.loads(out.read_text())["records"][0]
    assert record["world_size"] == RANKS
    assert all(abs(f - 1 / RANKS) < 0.05 for f in record["local_parameter_fraction_per_rank"])
    assert len(record["loss"]) == 3 and all(0 < x < 100 for x in record["loss"])
