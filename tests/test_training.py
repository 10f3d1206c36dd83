"""Training: the distillation loss, token packing and order, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import needs_wikitext2, tiny_model

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.training.checkpoints import (
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from littlebit.training.config import DistillConfig
from littlebit.training.distill import distill_loss, hidden_error, kl_per_token
from littlebit.training.optim import lr_factor
from littlebit.training.stream import Batches, SequenceOrder, load_tokens, pack_sequences

# ----- loss -------------------------------------------------------------------------------------


def test_kl_is_zero_for_identical_logits_and_matches_definition():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    s = torch.randn(2, 5, 11)
    assert kl_per_token(t, t).abs() < 1e-6
    p = t.softmax(-1)
    manual = (p * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(kl_per_token(s, t), manual, atol=1e-6)
    assert kl_per_token(s, t) > 0


def test_hidden_error_forms():
    torch.manual_seed(0)
    t = [torch.randn(2, 4, 8) * (10**i) for i in range(3)]
    s = [x + 0.1 * torch.randn_like(x) * (10**i) for i, x in enumerate(t)]
    paper = hidden_error(s, t, "paper")
    assert torch.allclose(paper, sum(((a - b) ** 2).mean() for a, b in zip(s, t, strict=True)))
    norm = hidden_error(s, t, "normalized")
    # The relative form weights every layer alike whatever its scale: about 0.01 here.
    assert 0.005 < norm.item() < 0.02
    scaled = hidden_error([x * 1000 for x in s], [x * 1000 for x in t], "normalized")
    assert torch.allclose(norm, scaled, rtol=1e-4)


def test_distill_loss_combines_terms_and_validates():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(1, 3, 7, requires_grad=True), torch.randn(1, 3, 7)
    hs, ht = [torch.randn(1, 3, 4, requires_grad=True)], [torch.randn(1, 3, 4)]
    loss, parts = distill_loss(s_logits, t_logits, hs, ht, DistillConfig(form="paper"))
    assert torch.allclose(loss, parts["kl"] + 10 * parts["hidden"])
    loss.backward()
    assert s_logits.grad is not None and hs[0].grad is not None
    loss, parts = distill_loss(s_logits, t_logits, hs, ht, DistillConfig(hidden_weight=0))
    assert "hidden" not in parts and torch.allclose(loss, parts["kl"])
    with pytest.raises(LittleBitError):
        DistillConfig(form="nope")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LittleBitError, match="hidden-state weight must be a finite number"):
            DistillConfig(hidden_weight=bad)
        with pytest.raises(LittleBitError, match="temperature must be a finite number"):
            DistillConfig(temperature=bad)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


# ----- data -------------------------------------------------------------------------------------


def test_pack_sequences_drops_the_tail():
    seqs = pack_sequences(torch.arange(23), 5)
    assert seqs.shape == (4, 5) and seqs[-1].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(LittleBitError):
        pack_sequences(torch.arange(3), 5)


def test_order_is_seeded_and_covers_each_epoch():
    order = SequenceOrder(7, seed=3)
    first = order.indices(0, 7)
    assert sorted(first) == list(range(7))
    assert SequenceOrder(7, seed=3).indices(0, 14) == first + order.indices(7, 7)
    assert order.indices(7, 7) != first  # a fresh permutation each epoch
    assert SequenceOrder(7, seed=4).indices(0, 7) != first


def test_batches_resume_from_their_position():
    seqs = pack_sequences(torch.arange(100), 4)
    a = Batches(seqs, 3, seed=1)
    run = [a.next() for _ in range(10)]
    b = Batches(seqs, 3, seed=1, position=run and 3 * 6)
    assert all(torch.equal(x, y) for x, y in zip(run[6:], [b.next() for _ in range(4)], strict=True))


def test_load_tokens_accepts_ids_and_rejects_floats():
    assert load_tokens(torch.tensor([[1, 2], [3, 4]])).tolist() == [1, 2, 3, 4]
    with pytest.raises(LittleBitError):
        load_tokens(torch.zeros(3))
    with pytest.raises(LittleBitError):
        load_tokens("some/text/file.txt", tokenizer=None)


# ----- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_roundtrip_with_optimizer(tmp_path):
    p, r = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    groups = [
        {"params": [p], "lr": 0.1, "base_lr": 0.1, "kind": "a"},
        {"params": [r], "lr": 0.2, "kind": "b"},
    ]
    opt = torch.optim.AdamW(groups, foreach=False)
    p.grad, r.grad = torch.randn_like(p), torch.randn_like(r)
    opt.step()
    tensors, meta = optimizer_to_flat(opt, {id(p): "p", id(r): "r"})
    assert meta["param_groups"][1]["params"] == ["r"] and "optim.p.exp_avg" in tensors
    for i, tag in enumerate(("global-000001", "global-000002", "global-000003")):
        save_checkpoint(tmp_path, tag, {"w": p.detach() + i, **tensors}, {"optimizer": meta, "step": i})
    assert [f.name for f in list_checkpoints(tmp_path)] == [
        "state-global-000002.json",
        "state-global-000003.json",
    ]
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 2
    loaded, meta2, path = load_checkpoint(tmp_path)
    assert meta2["step"] == 2 and torch.equal(loaded["w"], p.detach() + 2) and path.name.endswith("3.json")
    q, s = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(r.detach().clone())
    # Named, not positional: the parameters are handed over in another order.
    opt2 = optimizer_from_flat(loaded, meta2["optimizer"], {"r": s, "p": q}, {"p": "a", "r": "b"})
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.2]
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    assert torch.equal(opt2.state[s]["exp_avg_sq"], opt.state[r]["exp_avg_sq"])
    with pytest.raises(LittleBitError, match="shape"):
        optimizer_from_flat(loaded, meta2["optimizer"], {"p": s, "r": q}, {"p": "a", "r": "b"})
    with pytest.raises(LittleBitError, match="does not cover"):
        optimizer_from_flat(loaded, meta2["optimizer"], {"p": q}, {"p": "a"})
    with pytest.raises(LittleBitError, match="group"):
        optimizer_from_flat(loaded, meta2["optimizer"], {"r": s, "p": q}, {"p": "b", "r": "b"})
    assert load_checkpoint(tmp_path / "none") is None


# ----- kill and resume --------------------------------------------------------------------------


def _tiny_run(work: str, resume: bool) -> dict[str, torch.Tensor]:
    """Train a tiny random Llama (block stage and 9 global steps); the student's final weights.

    One thread, in the test process and in the subprocesses alike: matmul results may depend on
    how the work is split between threads, and the comparison is bitwise.
    """
    from littlebit.config import LittleBitConfig
    from littlebit.training.config import BlockConfig, TrainConfig
    from littlebit.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama", seed=0)
        tokens = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
        blocks = BlockConfig(sequences=8, epochs=2, batch_size=4)
        tc = TrainConfig(steps=9, seqlen=32, batch_size=4, blocks=blocks, calib_sequences=4, save_every=3)
        lb = LittleBitConfig(bpw=4.0, init="itq")
        res = train(model, tokens, lb, tc, work, resume=resume, progress=False)
        return {n: p.detach().clone() for n, p in res.student.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[4])
    import test_training
    from littlebit.training.trainer import Trainer
    import littlebit.training.blockwise as bw

    work, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    phase, n = kill_at.split(":")
    if phase == "block":  # SIGKILL when the fit of decoder layer n starts (layers before it are saved)
        orig_fit = bw.fit_layer
        def fit(layer, *a, **k):
            if a[-2] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_fit(layer, *a, **k)
        bw.fit_layer = fit
    elif phase == "global":  # SIGKILL right after the optimizer step of global step n, unsaved
        orig_step = Trainer._train_step
        def step(self, *a):
            parts = orig_step(self, *a)
            if self.step + 1 == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return parts
        Trainer._train_step = step
    test_training._tiny_run(work, resume)
    """
)


def _run_killed(tmp_path: Path, work: str, kill_at: str, resume: bool) -> int:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).parent)
    args = [sys.executable, str(script), str(tmp_path / work), kill_at, "1" if resume else "0", here]
    return subprocess.run(args, env=env, capture_output=True, timeout=300).returncode


def test_sigkill_and_resume_end_with_identical_weights(tmp_path):
    # Killed twice in subprocesses: while fitting the second decoder layer, then between two
    # checkpoints of the global phase; resumed to the end here, and compared with a clean run.
    assert _run_killed(tmp_path, "killed", "block:1", False) == -signal.SIGKILL
    meta = json.loads(list_checkpoints(tmp_path / "killed")[-1].read_text())
    assert meta["phase"] == "blocks" and meta["next_block"] == 1
    assert _run_killed(tmp_path, "killed", "global:5", True) == -signal.SIGKILL
    meta = json.loads(list_checkpoints(tmp_path / "killed")[-1].read_text())
    assert meta["phase"] == "global" and meta["step"] == 3
    resumed = _tiny_run(str(tmp_path / "killed"), resume=True)
    plain = _tiny_run(str(tmp_path / "plain"), resume=False)

    assert plain.keys() == resumed.keys()
    for name, tensor in plain.items():
        assert torch.equal(tensor, resumed[name]), name
    log = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["phase"] == "global"]
    assert steps == list(range(1, 10))  # the killed run's lines past its checkpoint are dropped


def test_resume_refuses_other_data_config_or_model(tmp_path):
    from littlebit.config import LittleBitConfig
    from littlebit.training.config import BlockConfig, TrainConfig
    from littlebit.training.trainer import train

    model = tiny_model("llama", seed=0)
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    tc = TrainConfig(steps=1, seqlen=16, batch_size=2, blocks=BlockConfig(sequences=0), calib_sequences=2)
    lb = LittleBitConfig(bpw=4.0)
    train(model, tokens, lb, tc, tmp_path, progress=False)
    with pytest.raises(LittleBitError, match="other training data"):
        train(model, tokens.flip(0), lb, tc, tmp_path, resume=True, progress=False)
    with pytest.raises(LittleBitError, match="another LittleBit config"):
        train(model, tokens, LittleBitConfig(bpw=3.0), tc, tmp_path, resume=True, progress=False)
    other = tiny_model("llama", seed=1)  # the same architecture, other weights
    with pytest.raises(LittleBitError, match="made from another model"):
        train(other, tokens, lb, tc, tmp_path, resume=True, progress=False)
    train(model, tokens, lb, tc, tmp_path, resume=True, progress=False)  # the same model resumes


# ----- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_wikitext2
def test_short_cpu_run_lowers_perplexity(tmp_path, default_model):
    """Ten steps of 2 x 128 tokens on SmolLM2-135M at 1 BPW must lower perplexity at least a
    hundredfold (seen: 7.0e7 -> 2.9e5 over 4 windows of 256).

    Dual-SVID keeps the initialisation fast on two cores (Joint-ITQ, where the default starts, is the
    slow part on a CPU: with it, 30 steps of 2 x 256 took PPL 3.35e6 -> 2,588).
    """
    from littlebit.config import LittleBitConfig
    from littlebit.evaluation.perplexity import perplexity, tokenize_eval
    from littlebit.training.config import BlockConfig, TrainConfig
    from littlebit.training.trainer import train

    teacher, tokenizer = default_model
    eval_ids = tokenize_eval(tokenizer, "wikitext2", "test")[:, : 4 * 256]
    cfg = TrainConfig(
        steps=10,
        seqlen=128,
        batch_size=2,
        blocks=BlockConfig(sequences=0),
        eval_every=0,
        eval_windows=4,
        eval_seqlen=256,
        save_every=0,
    )
    lb = LittleBitConfig(bpw=1.0, init="dual-svid")
    result = train(teacher, "wikitext2:valid", lb, cfg, tmp_path, tokenizer, eval_ids)
    first, last = result.history[0]["ppl"], result.history[-1]["ppl"]
    assert math.isfinite(last) and last < 0.01 * first
    assert last == pytest.approx(perplexity(result.student, eval_ids, 256, 4, progress=False), rel=1e-3)


def test_train_command_arguments():
    import argparse

    from littlebit.cli.train import add_arguments as add_train_arguments
    from littlebit.cli.train import config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--bpw", "0.55", "--out", "x", "--steps", "7", "--init", "dual-svid", "--resume"]
    )
    lb, cfg = config_from_args(args)
    assert (lb.bpw, lb.init, cfg.steps, args.resume, args.model) == (0.55, "dual-svid", 7, True, None)
    from littlebit.training.config import TrainConfig

    _, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x"]))
    d = TrainConfig()
    assert (cfg.steps, cfg.batch_size, cfg.blocks) == (d.steps, d.batch_size, d.blocks)
    assert cfg.max_grad_norm == d.max_grad_norm == 1.0
    for flag, norm in (("0", None), ("0.5", 0.5)):
        _, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--max-grad-norm", flag]))
        assert cfg.max_grad_norm == norm
    with pytest.raises(LittleBitError):
        config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--max-grad-norm", "-1"]))
    _, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--block-batch-size", "3"]))
    assert cfg.blocks.batch_size == 3
    with pytest.raises(SystemExit):  # a usage error, refused while parsing
        parser.parse_args(["--bpw", "20", "--out", "x"])


def _command_config(command: str, *argv: str) -> LittleBitConfig:
    """The LittleBitConfig ``littlebit COMMAND --out x ARGV`` would compress with."""
    import argparse

    from littlebit.cli.common import compression_config
    from littlebit.cli.compress import add_arguments as add_compress_arguments
    from littlebit.cli.train import add_arguments as add_train_arguments
    from littlebit.cli.train import config_from_args

    parser = argparse.ArgumentParser()
    (add_train_arguments if command == "train" else add_compress_arguments)(parser)
    args = parser.parse_args(["--out", "x", *argv])
    return config_from_args(args)[0] if command == "train" else compression_config(args)


def test_path_layout_defaults_and_flags(tmp_path):
    """train: one path from 409,600 training tokens (the default budget among them), the residual pair
    below, counted from --tokens or from stages sized by hand; compress: the pair. The flags win over
    both, and a config file's layout over the command's default."""

    def layout(command, *argv):
        return _command_config(command, *argv).residual

    train, compress = "train", "compress"

    assert not any(layout(train, "--bpw", b) for b in ("0.1", "0.3", "0.55", "1", "2"))
    assert layout(train, "--bpw", "1", "--tokens", "409600") is False
    assert layout(train, "--bpw", "1", "--tokens", "409599") is True
    assert layout(train, "--bpw", "0.55", "--tokens", "30000") is True
    # 100 steps of 2 x 512 and 16 calibration sequences: 110,592 tokens
    assert layout(train, "--bpw", "1", "--steps", "100", "--block-sequences", "0") is True
    assert layout(train, "--bpw", "1", "--steps", "1000", "--block-sequences", "0") is False
    assert layout(compress, "--bpw", "0.55") is True
    assert layout(train, "--bpw", "0.55", "--residual") is True
    assert layout(train, "--bpw", "1", "--no-residual") is False
    assert layout(compress, "--bpw", "0.3", "--no-residual") is False
    for residual in (True, False):
        path = tmp_path / f"c{residual}.json"
        path.write_text(LittleBitConfig(bpw=0.3, residual=residual).to_json())
        assert layout(train, "--bpw", "1", "--config", str(path)) is residual
        assert layout(train, "--bpw", "1", "--tokens", "30000", "--config", str(path)) is residual
        assert layout(compress, "--bpw", "0.3", "--config", str(path)) is residual
        assert layout(train, "--bpw", "1", "--config", str(path), "--residual") is True
    # a config file without the field leaves the command's default
    path = tmp_path / "bare.json"
    path.write_text(LittleBitConfig(bpw=0.3).to_json().replace('"residual": true,', ""))
    assert '"residual"' not in path.read_text()
    assert layout(train, "--bpw", "0.3", "--config", str(path)) is False


def test_attention_bit_split_defaults_and_flags(tmp_path):
    """train: the attention projections at 1.5x the target from 409,600 training tokens, uniform below;
    compress: uniform. The flag wins over both, and a config file's factor over the command's default."""

    def factor(command, *argv):
        return _command_config(command, *argv).attention_bpw_factor

    train, compress = "train", "compress"

    assert factor(train, "--bpw", "1") == 1.5
    assert factor(train, "--bpw", "0.55", "--tokens", "409600") == 1.5
    assert factor(train, "--bpw", "0.55", "--tokens", "409599") == 1.0
    assert factor(compress, "--bpw", "0.55") == 1.0
    assert factor(train, "--bpw", "1", "--attention-bpw-factor", "1") == 1.0
    assert factor(compress, "--bpw", "1", "--attention-bpw-factor", "2") == 2.0
    path = tmp_path / "c.json"
    path.write_text(LittleBitConfig(bpw=0.3, attention_bpw_factor=1.25).to_json())
    assert factor(train, "--bpw", "1", "--config", str(path)) == 1.25
    assert factor(train, "--bpw", "1", "--tokens", "30000", "--config", str(path)) == 1.25
    assert factor(train, "--bpw", "1", "--config", str(path), "--attention-bpw-factor", "1.5") == 1.5


def _tiny_global_run(tmp_path: Path, **overrides):
    """(student's state before training, the trainer after, its log records): global phase, tiny Llama."""
    from littlebit.config import LittleBitConfig
    from littlebit.training.config import BlockConfig, TrainConfig
    from littlebit.training.trainer import Trainer

    model = tiny_model("llama", seed=0)
    device = overrides.pop("device", "cpu")
    eval_ids = overrides.pop("eval_ids", None)
    model = model.to(device)
    tokens = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    overrides.setdefault("blocks", BlockConfig(sequences=0))
    overrides.setdefault("steps", 6)
    overrides.setdefault("save_every", 0)
    tc = TrainConfig(seqlen=32, batch_size=4, **overrides)
    lb = LittleBitConfig(bpw=4.0)
    trainer = Trainer(model, tokens, lb, tc, tmp_path / "w", eval_ids=eval_ids, progress=False)
    trainer.setup(False)
    before = {n: t.detach().clone() for n, t in trainer.student.state_dict().items()}
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    return before, trainer, [r for r in records if r.get("phase") == "global"]


def test_failed_graph_recording_falls_back_to_eager(monkeypatch, caplog):
    from littlebit.runtime import step_graph

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(step_graph.torch.cuda, "graph", Broken)
    monkeypatch.setattr(step_graph.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(step_graph.torch.cuda, "synchronize", lambda: None)
    calls = []
    step = step_graph.GraphedMicroStep(lambda b: calls.append(b) or {"loss": b.float().sum()}, warmup=1)
    with caplog.at_level("WARNING"):
        outs = [step(torch.full((2,), i)) for i in range(3)]
    assert not step.active and step.failed and len(calls) == 3
    assert [o["loss"].item() for o in outs] == [0.0, 2.0, 4.0]
    assert "staying eager" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_steps_match_eager_steps(tmp_path):
    _, eager, log_e = _tiny_global_run(tmp_path / "e", device="cuda", cuda_graphs=False, compile=False)
    _, graphed, log_g = _tiny_global_run(tmp_path / "g", device="cuda", cuda_graphs=True, compile=False)
    assert [r["step"] for r in log_e] == [r["step"] for r in log_g]
    for re_, rg in zip(log_e, log_g, strict=True):
        assert math.isclose(re_["loss"], rg["loss"], rel_tol=2e-2), (re_, rg)
    assert graphed._micro.active and not eager.use_graphs
    pairs = zip(eager.student.state_dict().items(), graphed.student.state_dict().values(), strict=True)
    for (n, pe), pg in pairs:
        assert torch.allclose(pe.float(), pg.float(), rtol=2e-2, atol=1e-3), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recorded_block_steps_match_eager_steps(tmp_path, watch_recorded_steps):
    import littlebit.training.blockwise as blockwise
    from littlebit.training.config import BlockConfig

    made = watch_recorded_steps(blockwise)
    blocks = BlockConfig(sequences=8, epochs=3, batch_size=2)
    run = {"device": "cuda", "compile": False, "steps": 0, "blocks": blocks}
    before, eager, _ = _tiny_global_run(tmp_path / "e", cuda_graphs=False, **run)
    _, graphed, _ = _tiny_global_run(tmp_path / "g", cuda_graphs=True, **run)
    assert made and all(step.active for step in made)  # every layer's step was recorded and replayed
    after_e, after_g = eager.student.state_dict(), graphed.student.state_dict()
    assert any(not torch.equal(before[n], after_e[n]) for n in before if n.endswith(".u"))
    for n, pe in after_e.items():
        assert torch.allclose(pe.float(), after_g[n].float(), rtol=2e-2, atol=1e-3), n


@pytest.mark.parametrize("bpw", ["1.0", "0.55", "0.3"])
def test_the_benchmarked_default_recipe_is_what_train_runs(bpw, monkeypatch):
    """The held-out numbers in BENCHMARKS.md for ``--variant default`` are claims about ``littlebit
    train --bpw BPW --out DIR``: the benchmark must build the same configs and data as the command."""
    import argparse
    import dataclasses
    import sys
    from pathlib import Path

    from littlebit.cli.train import add_arguments, config_from_args
    from littlebit.training.data import _spec

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "qat", raising=False)
    import qat

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lb, cfg = config_from_args(parser.parse_args(["--bpw", bpw, "--out", "x"]))
    # the benchmark's documented command: --runs BPW:itq-refined --grad-power 0.5 --variant default
    args = qat.build_parser().parse_args(["--runs", f"{bpw}:itq-refined", "--grad-power", "0.5"])
    bench_lb = qat.littlebit_config(float(bpw), "itq-refined", "default", args.tokens)
    bench_cfg = qat.train_config("default", args, bench_lb)
    assert bench_lb == lb
    # what the benchmark sets apart from the recipe: its evaluations along the run and its checkpoints
    how_run = ("eval_every", "eval_windows", "eval_seqlen", "save_every")
    same = {f.name for f in dataclasses.fields(cfg)} - set(how_run)
    assert {k: getattr(bench_cfg, k) for k in same} == {k: getattr(cfg, k) for k in same}
    assert qat.data_spec("default", args) == _spec(None, cfg)


@pytest.mark.parametrize(
    ("every", "interval", "expected"),
    [
        (0, 0.0, [("global", 0), ("global", 6)]),  # the end of each phase only
        (3, 0.0, [("blocks", 1), ("blocks", 2), ("global", 0), ("global", 3), ("global", 6)]),
        (0, 1e-9, [("blocks", 1), ("blocks", 2), ("global", 0), *[("global", i) for i in range(1, 7)]]),
    ],
    ids=["phase-ends", "by-steps", "by-time"],
)
def test_checkpoints_by_steps_by_time_and_at_phase_ends(tmp_path, monkeypatch, every, interval, expected):
    from littlebit.training.config import BlockConfig
    from littlebit.training.trainer import Trainer

    saves = []
    save = Trainer.save

    def counted(self):
        saves.append((self.phase, self.next_block if self.phase == "blocks" else self.step))
        return save(self)

    monkeypatch.setattr(Trainer, "save", counted)
    blocks = BlockConfig(sequences=4, epochs=1, batch_size=4)
    run = {"blocks": blocks, "save_every": every, "save_interval_s": interval}
    _tiny_global_run(tmp_path, **run)
    assert saves == expected
