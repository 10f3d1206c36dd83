"""Text the teacher writes: seeded shards, resumable caching, data mixtures, and the run's budget."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from littlebit.config import LittleBitError
from littlebit.training.config import BlockConfig, TextGenConfig, TrainConfig
from littlebit.training.data import training_sequences
from littlebit.training.data_spec import mixture_counts, parse_data_spec
from littlebit.training.recipe import describe, plan_budget, stages
from littlebit.training.teacher_text import TextCache

GEN = TextGenConfig(length=32, batch_size=2)  # the chat start alone is 24 tokens


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    import transformers as tf

    from littlebit.hf.models import load_tokenizer

    return tf.AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), load_tokenizer(str(tiny_dir))


def _shards(cache: TextCache) -> list[torch.Tensor]:
    return [load_file(str(cache.shard_path(i)))["tokens"] for i in range(cache.available())]


def test_shards_are_a_function_of_the_seed(teacher, tmp_path):
    model, tok = teacher
    a = TextCache(model, tok, GEN, tmp_path / "a")
    b = TextCache(model, tok, GEN, tmp_path / "b")
    other = TextCache(model, tok, dataclasses.replace(GEN, seed=1), tmp_path / "a")
    assert a.ensure(1, limit=3) == b.ensure(1, limit=3) == 1 and other.ensure(1) == 1
    assert a.ensure(10**6, limit=2) == b.ensure(10**6, limit=2) == 3
    assert a.dir.name == b.dir.name != other.dir.name
    for x, y in zip(_shards(a), _shards(b), strict=True):
        assert x.dtype == torch.int32 and x.dim() == 1 and torch.equal(x, y)
    assert not torch.equal(_shards(a)[0], _shards(other)[0])
    # One start kind per shard, in turn: BOS, BOS + a random token, the chat template's user turn.
    first = [s[0].item() for s in _shards(a)]
    assert first[0] == first[1] == tok.bos_token_id
    chat = tok(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)).input_ids
    assert _shards(a)[2][:3].tolist() == chat[:3]
    # Each document ends at its first end token past the prompt, or runs to the full length.
    for i in range(3):
        lengths = load_file(str(a.shard_path(i)))["lengths"]
        docs = _shards(a)[i].split(lengths.tolist())
        assert len(docs) == GEN.batch_size and a.shard_tokens(i) == int(lengths.sum())
        for d in docs:
            assert len(d) <= GEN.length and (d[-1] == tok.eos_token_id or len(d) == GEN.length)
    whole = torch.cat(_shards(a)).long()
    assert torch.equal(a.load(30), whole[:30]) and a.tokens_available() == whole.numel()
    with pytest.raises(LittleBitError, match="holds"):
        a.load(whole.numel() + 1)


def test_interrupted_generation_resumes_to_the_same_shards(teacher, tmp_path):
    model, tok = teacher
    whole = TextCache(model, tok, GEN, tmp_path / "whole")
    whole.ensure(10**6, limit=4)
    part = TextCache(model, tok, GEN, tmp_path / "part")
    assert part.ensure(10**6, limit=2) == 2
    # What a writer killed mid-shard leaves: a temporary of a process that no longer runs.
    stale = part.dir / ".shard-00002.safetensors.tmp-999999999-0"
    stale.write_bytes(b"half a shard")
    assert part.ensure(whole.tokens_available()) == 4 and not stale.exists()
    for x, y in zip(_shards(whole), _shards(part), strict=True):
        assert torch.equal(x, y)
    # The settings file keys the folder: other settings written there are refused.
    (part.dir / "settings.json").write_text(json.dumps({"format": 0}))
    with pytest.raises(LittleBitError, match="other settings"):
        part.ensure(10**6)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("generated", [("generated", 1.0)]),
        ("generated:0.7,wikitext2:valid:0.3", [("generated", 0.7), ("wikitext2:valid", 0.3)]),
        ("wikitext2:valid", [("wikitext2:valid", 1.0)]),
        ("a.txt:3, b.txt", [("a.txt", 0.75), ("b.txt", 0.25)]),
    ],
)
def test_data_specs_parse(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some text")
    got = [(s.source, pytest.approx(s.weight)) for s in parse_data_spec(spec)]
    assert got == expected


def test_one_file_named_two_ways_is_named_twice(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some text\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LittleBitError, match="named twice"):
        parse_data_spec(f"a.txt:0.5,./a.txt:0.3,{tmp_path}/a.txt:0.2")


def test_data_weights_near_the_float_maximum_still_split():
    spec = "generated:1e308,wikitext2:valid:1e308"
    assert [s.weight for s in parse_data_spec(spec)] == [0.5, 0.5]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ",",
        "a.txt,",
        "a.txt:0",
        "a.txt:-1",
        "a.txt:nan",
        "a.txt:inf",
        "x:1,x:2",
        "generated:abc",
        ":0.3",
        "no-such-source",
        "wikitext2:valid:0.5:0.5",
        "ptb:dev",
    ],
)
def test_bad_data_specs_are_refused_in_one_line(spec, capsys):
    with pytest.raises(LittleBitError) as err:
        parse_data_spec(spec)
    assert "\n" not in str(err.value)
    code, out, stderr = run_cli(capsys, "train", "--bpw", "1", "--out", "x", "--data", spec)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_mixture_counts_are_exact():
    assert mixture_counts([0.7, 0.3], 10) == [7, 3]
    assert mixture_counts([1 / 3] * 3, 10) == [4, 3, 3]
    assert sum(mixture_counts([0.123, 0.456, 0.421], 997)) == 997


def test_mixture_has_the_asked_proportions(teacher, tmp_path):
    model, tok = teacher
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{i}" for i in range(400)))
    cfg = TrainConfig(seqlen=32, generation=GEN, data_tokens=32 * 20)
    seqs = training_sequences(f"generated:0.75,{text}:0.25", cfg, tok, model, tmp_path / "cache")
    file_seqs = training_sequences(str(text), cfg, tok)
    from_file = sum(any(torch.equal(s, f) for f in file_seqs) for s in seqs)
    assert seqs.shape == (20, 32) and from_file == 5
    # Generated alone: the cached shards, in order, then shuffled with a fixed seed.
    gen_only = training_sequences("generated", cfg, tok, model, tmp_path / "cache")
    cache = TextCache(model, tok, GEN, tmp_path / "cache")
    assert sorted(map(tuple, gen_only.tolist())) == sorted(map(tuple, cache.load(640).view(20, 32).tolist()))
    assert cache.tokens_available() >= 640


def test_a_failed_first_shard_leaves_no_folder_and_a_length_past_the_context_is_refused(
    teacher, tmp_path, monkeypatch
):
    model, tok = teacher
    cache = TextCache(model, tok, GEN, tmp_path / "out" / "cache")

    def broken(index):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache, "sample_shard", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.ensure(100)
    assert not (tmp_path / "out").exists()
    too_long = dataclasses.replace(GEN, length=model.config.max_position_embeddings + 1)
    with pytest.raises(LittleBitError, match="exceeds the model's"):
        TextCache(model, tok, too_long, tmp_path / "long")


def test_a_missing_text_source_fails_before_any_text_is_generated(teacher, tmp_path, monkeypatch):
    model, tok = teacher
    import littlebit.training.teacher_text as teacher_text

    def no_generation(*args, **kwargs):
        raise AssertionError("generated text before reading the text source")

    monkeypatch.setattr(teacher_text.TextCache, "ensure", no_generation)
    cfg = TrainConfig(seqlen=32, generation=GEN, data_tokens=32 * 20)
    with pytest.raises(LittleBitError, match="not found"):
        training_sequences(f"generated:0.5,{tmp_path / 'missing.txt'}:0.5", cfg, tok, model, tmp_path / "c")


def test_budget_split_reproduces_the_defaults_and_stays_within_small_budgets():
    d = TrainConfig()
    planned = plan_budget(TrainConfig(steps=1), 1_638_400)
    assert (planned.steps, planned.blocks, planned.calib_sequences) == (d.steps, d.blocks, d.calib_sequences)
    for tokens in (30_000, 400_000, 16_000_000):
        cfg = plan_budget(d, tokens)
        spent = (
            cfg.calib_sequences * cfg.seqlen + cfg.blocks.tokens(cfg.seqlen) + cfg.steps * cfg.tokens_per_step
        )
        assert tokens - cfg.tokens_per_step < spent <= tokens and cfg.tokens == tokens
    small = plan_budget(d, 30_000)
    assert small.calib_sequences == 2 and small.blocks.sequences == 4
    with pytest.raises(LittleBitError, match="too small"):
        plan_budget(d, 1000)
    plan = stages(small, "dual-svid", 15_000, "cpu")
    assert [s.name for s in plan][0] == "generate text" and "total" in describe(plan, "cpu")
    # the loss-gradient pass over the calibration tokens is part of the initialisation's time
    weighted = stages(dataclasses.replace(small, grad_power=0.5), "dual-svid", 0, "cpu")
    assert weighted[0].seconds > stages(small, "dual-svid", 0, "cpu")[0].seconds


def test_train_command_splits_its_budget():
    import argparse

    from littlebit.cli.train import DEFAULT_GRAD_POWER, add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lb, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--tokens", "30000"]))
    assert lb.init == "itq-refined" and cfg.tokens == 30_000 and cfg.blocks.sequences == 4
    assert cfg.grad_power == DEFAULT_GRAD_POWER > 0 and cfg.uses_calibration
    lb, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x"]))
    assert lb.init == "itq-refined" and (cfg.steps, cfg.blocks) == (TrainConfig().steps, TrainConfig().blocks)
    lb, _ = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--init", "itq"]))
    assert lb.init == "itq"
    _, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--grad-power", "0"]))
    assert cfg.grad_power == 0
    _, cfg = config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--grad-power", "1"]))
    assert cfg.grad_power == 1
    with pytest.raises(LittleBitError, match="--tokens"):
        config_from_args(parser.parse_args(["--bpw", "1", "--out", "x", "--tokens", "9", "--steps", "3"]))


def test_training_on_generated_text_resumes_on_the_same_data(teacher, tmp_path):
    from littlebit.config import LittleBitConfig
    from littlebit.training.trainer import train

    model, tok = teacher
    cfg = TrainConfig(
        steps=2, seqlen=32, batch_size=2, blocks=BlockConfig(sequences=0), calib_sequences=2, generation=GEN
    )
    lb = LittleBitConfig(bpw=4.0)
    res = train(model, "generated", lb, cfg, tmp_path / "w", tok, progress=False, data_cache=tmp_path / "c")
    assert res.tokens == 2 * 32 + 2 * 2 * 32
    # Resuming reads the cached shards again: the same data, so the checkpoint is accepted.
    again = train(
        model,
        "generated",
        lb,
        cfg,
        tmp_path / "w",
        tok,
        resume=True,
        progress=False,
        data_cache=tmp_path / "c",
    )
    assert again.tokens == res.tokens


@pytest.mark.parametrize(
    "edit", ["in the vocabulary", "past the vocabulary", "no digest, past the vocabulary"]
)
def test_an_edited_shard_is_refused(teacher, tmp_path, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, tok = teacher
    cache = TextCache(model, tok, GEN, tmp_path)
    cache.ensure(1)
    path = cache.shard_path(0)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors["tokens"][0] = 5 if "in the" in edit else model.config.vocab_size
    if "no digest" in edit:  # a shard written without one is still checked against the vocabulary
        del meta["sha256"]
    save_file(tensors, str(path), meta)
    with pytest.raises(LittleBitError, match="was altered or damaged: delete it"):
        cache.load(10)


def test_an_unwritable_cache_is_one_line(teacher, tmp_path):
    model, tok = teacher
    (tmp_path / "file").write_text("")
    cache = TextCache(model, tok, GEN, tmp_path / "file")  # a folder under a file
    with pytest.raises(LittleBitError, match="cannot write generated text"):
        cache.ensure(1)


def test_the_largest_seed_orders_and_generates(teacher, tmp_path):
    from littlebit.training.stream import SequenceOrder

    assert sorted(SequenceOrder(5, seed=2**63 - 1).indices(0, 5)) == list(range(5))
    model, tok = teacher
    assert TextCache(model, tok, dataclasses.replace(GEN, seed=2**63 - 1), tmp_path).ensure(1) == 1


def test_generate_data_command(tiny_dir, tmp_path, capsys):
    argv = ["generate-data", str(tiny_dir), "--tokens", "100", "--length", "32", "--batch-size", "2"]
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path), "--device", "cpu")
    summary = json.loads(out)
    assert code == 0 and summary["tokens"] >= 100 and summary["generated_tokens"] == summary["tokens"]
    code, out, _ = run_cli(capsys, *argv, "--out", str(tmp_path), "--device", "cpu")
    assert code == 0 and json.loads(out)["generated_tokens"] == 0  # all cached
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path), "--top-p", "0")
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path), "--seed", str(2**63))
    assert code == 2 and "must be at most" in err and err.count("\n") == 1


def test_default_data_is_generated_text_without_a_local_corpus(tmp_path, monkeypatch):
    from littlebit.training import data_spec
    from littlebit.training.data_spec import (
        DEFAULT_MIXTURE,
        DEFAULT_WITH_LOCAL_CORPUS,
        GENERATED,
        MIXTURE_FROM_TOKENS,
        default_data_spec,
    )

    # only tmp_path is searched: a shared/data above the test's folder must not count
    monkeypatch.setattr(data_spec, "default_data_dirs", lambda: [tmp_path / "shared" / "data"])
    assert default_data_spec() == GENERATED
    assert default_data_spec(10 * MIXTURE_FROM_TOKENS) == GENERATED
    (tmp_path / "shared" / "data" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw").write_text("text\n")
    assert default_data_spec() == DEFAULT_WITH_LOCAL_CORPUS
    # the split alone while the run reads it at most once, the mixture when it would repeat
    assert default_data_spec(MIXTURE_FROM_TOKENS) == DEFAULT_WITH_LOCAL_CORPUS
    assert default_data_spec(MIXTURE_FROM_TOKENS + 1) == DEFAULT_MIXTURE
    assert [s.source for s in data_spec.parse_data_spec(DEFAULT_MIXTURE)] == [GENERATED, "wikitext2:valid"]


def test_a_large_budget_reads_the_default_mixture(tmp_path, monkeypatch):
    from littlebit.training import data_spec
    from littlebit.training.config import TrainConfig
    from littlebit.training.data import generated_tokens_needed

    monkeypatch.setattr(data_spec, "default_data_dirs", lambda: [tmp_path])
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").write_text("text\n")
    small = TrainConfig(steps=10, batch_size=2, seqlen=512, calib_sequences=0, blocks={"sequences": 0})
    assert generated_tokens_needed(None, small) == 0
    large = TrainConfig(steps=1000, batch_size=2, seqlen=512, calib_sequences=0, blocks={"sequences": 0})
    assert generated_tokens_needed(None, large) == 1400 * 512  # 70 % of the 2000 sequences


def test_train_command_prints_its_plan_and_keeps_to_its_budget(tiny_dir, tmp_path, capsys):
    argv = ["train", str(tiny_dir), "--bpw", "4", "--out", str(tmp_path / "m"), "--tokens", "2000"]
    argv += ["--data", "generated", "--seqlen", "32", "--gen-batch-size", "16", "--eval-windows", "1"]
    code, out, err = run_cli(capsys, *argv, "--generated-dir", str(tmp_path / "g"), "--device", "cpu")
    assert code == 0, err
    assert "layers: 4 BPW, two paths (the residual pair) each" in err  # 2,000 tokens: the pair
    plan = err[err.index("plan:") :].splitlines()[:6]
    assert [line.split()[0] for line in plan[1:]] == ["generate", "calibrate", "block", "global", "total"]
    assert 2000 - 64 < json.loads(out.splitlines()[-1])["tokens"] <= 2000


def test_train_refuses_a_cache_that_cannot_exist_before_loading(tmp_path, capsys, monkeypatch):
    from littlebit.hf import models

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher loaded before the cache was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    (tmp_path / "file").write_text("")
    argv = ["train", "missing-model", "--bpw", "1", "--out", str(tmp_path / "m"), "--data", "generated"]
    code, _, err = run_cli(capsys, *argv, "--generated-dir", str(tmp_path / "file" / "g"), "--device", "cpu")
    assert code == 2 and "is a file" in err and err.count("\n") == 1


def test_a_chat_start_gets_an_answer_after_the_user_turn(teacher, tmp_path, monkeypatch):
    from littlebit.training.teacher_text import assistant_header

    model, tok = teacher
    forward = model.forward

    def ends_often(*args, **kwargs):  # a model that ends its turn about every tenth token
        out = forward(*args, **kwargs)
        out.logits[..., tok.eos_token_id] += torch.where(torch.rand(out.logits.shape[:-1]) < 0.1, 1e3, -1e3)
        return out

    monkeypatch.setattr(model, "forward", ends_often)
    cache = TextCache(model, tok, TextGenConfig(length=48, batch_size=4, starts=["chat"]), tmp_path)
    stream, lengths = cache.sample_shard(0)
    header = assistant_header(tok)
    assert tok.decode(header).strip() == "<|im_start|>assistant"
    answered = 0
    for doc in stream.split(lengths.tolist()):
        ids = doc.tolist()
        assert len(ids) <= 48
        for at in (i for i, t in enumerate(ids) if t == tok.eos_token_id and i >= len(cache.prompts["chat"])):
            answered += ids[at + 1 : at + 1 + len(header)] == header
            break
    assert answered >= 1


def test_gpu_batch_follows_the_models_cache_size() -> None:
    """The default GPU batch is the power of two whose static caches (in the model's dtype, a chat
    answer's pass counted at twice the length) fit the budget, from the config and dtype alone."""
    from types import SimpleNamespace

    from littlebit.training.teacher_text import resolved

    def model(dtype, **config):
        return SimpleNamespace(
            config=SimpleNamespace(**config), parameters=lambda: iter([torch.zeros(1, dtype=dtype)])
        )

    cuda = torch.device("cuda")
    smol = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    on_gpu = resolved(TextGenConfig(length=512), cuda, model(torch.float32, **smol))
    assert (on_gpu.dtype, on_gpu.batch_size) == ("bfloat16", 512)  # an fp32 teacher samples in bf16
    fp32 = resolved(TextGenConfig(length=512, dtype="float32"), cuda, model(torch.float32, **smol))
    assert fp32.batch_size == 256
    llama7b = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
    assert resolved(TextGenConfig(length=512), cuda, model(torch.float32, **llama7b)).batch_size == 32
    on_cpu = resolved(TextGenConfig(length=512), torch.device("cpu"), model(torch.float32, **smol))
    assert (on_cpu.dtype, on_cpu.batch_size) == ("float32", 32)
    assert resolved(TextGenConfig(length=512), cuda, model(torch.float16, **smol)).dtype == "float16"
    assert (
        resolved(TextGenConfig(length=512, batch_size=3), cuda, model(torch.float32, **smol)).batch_size == 3
    )


def test_a_sampling_twin_in_another_dtype_leaves_the_teacher_alone(teacher, tmp_path):
    """bf16 sampling of an fp32 teacher: a cast copy samples (tied weights stay tied), the teacher
    keeps its fp32 weights, and the dtype keys the cache."""
    from littlebit.training.teacher_text import sampling_twin

    model, tok = teacher
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin = sampling_twin(model, torch.bfloat16)
    assert twin is not model and all(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert sampling_twin(model, torch.float32) is model
    if model.config.tie_word_embeddings:
        assert twin.get_input_embeddings().weight is twin.get_output_embeddings().weight
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, twin(ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    bf16 = TextCache(model, tok, dataclasses.replace(GEN, dtype="bfloat16"), tmp_path)
    fp32 = TextCache(model, tok, dataclasses.replace(GEN, dtype="float32"), tmp_path)
    assert bf16.dir != fp32.dir
    bf16.ensure(1)
    assert bf16.shard_tokens(0) > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_no_memory_for_the_sampling_copy_is_one_clear_error(teacher, tmp_path, monkeypatch):
    import littlebit.training.teacher_text as teacher_text

    def no_memory(model, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(teacher_text, "sampling_twin", no_memory)
    model, tok = teacher
    model.train()
    cache = TextCache(model, tok, dataclasses.replace(GEN, dtype="bfloat16"), tmp_path)
    with pytest.raises(LittleBitError, match="no memory for a bfloat16 copy"):
        cache.ensure(1)
    assert model.training  # left as it was
    model.eval()
