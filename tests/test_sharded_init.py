"""A sharded run built on the meta device from a safetensors directory (``Distributed(source=...)``),
on two CPU processes over gloo: the students' initialisation is ``make_student``'s, the teacher's
shards are the checkpoint's, and training from it goes as from a teacher loaded whole."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from sharded_init_worker import CALIB_SEQUENCES, LB  # noqa: E402
from test_distributed import RANKS, _launch, _log, pytestmark  # noqa: E402, F401

from littlebit.hf.models import load_model  # noqa: E402
from littlebit.hf.shards import INDEX_NAME  # noqa: E402
from littlebit.training.student import make_student  # noqa: E402
from littlebit.training.trainer import Trainer  # noqa: E402

WORKER = Path(__file__).with_name("sharded_init_worker.py")


def _tiny_llama(tied: bool) -> tf.LlamaForCausalLM:
    # A vocabulary of 257 does not split evenly over the ranks (embedding shards of 129 and 128 rows).
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with tied embeddings, saved in fp32 in several files with an index."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    _tiny_llama(tied=True).save_pretrained(path, max_shard_size="60KB")
    assert (path / INDEX_NAME).is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with its own head, saved in bf16 in one file."""
    path = tmp_path_factory.mktemp("untied") / "model"
    _tiny_llama(tied=False).to(torch.bfloat16).save_pretrained(path)
    assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
    return path


def _run(tmp: Path, name: str, model: Path, *args: str, work: str | None = None) -> Path:
    out = tmp / f"{name}.safetensors"
    work = work or f"{name}-work"
    codes = _launch(tmp, name, str(model), str(tmp / work), str(out), *args, script=WORKER)
    assert codes == [0] * RANKS, (tmp / f"{name}-rank0.log").read_text()[-3000:]
    return out


@pytest.mark.parametrize("act_power, tied", [(1.0, True), (0.0, True), (1.0, False)])
def test_streamed_sharded_initialisation_is_make_students(model_dir, untied_dir, tmp_path, act_power, tied):
    import distributed_worker as worker

    model_dir = model_dir if tied else untied_dir

    state = load_file(str(_run(tmp_path, "init", model_dir, "init", "--act-power", str(act_power))))
    teacher = load_model(str(model_dir))
    cfg = worker.config()
    cfg.calib_sequences = CALIB_SEQUENCES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the SVDs then sum in the same order
    try:
        calib = Trainer(teacher, worker.tokens(), worker.LB, cfg, tmp_path / "one")._calibration()
        student = make_student(teacher, worker.LB, calib, act_power, cfg.latent_rms, progress=False)
        other = make_student(teacher, worker.LB, calib, 1.0 - act_power, cfg.latent_rms, progress=False)
    finally:
        torch.set_num_threads(threads)
    expected = student.state_dict()
    got = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"]) == tied
    # Activation-aware or not made a difference, so the statistics were compared too.
    assert not torch.equal(
        other.state_dict()["model.layers.1.mlp.down_proj.g"], got["model.layers.1.mlp.down_proj.g"]
    )
    for rank in range(RANKS):  # each rank holds about half of each model
        share = json.loads((tmp_path / f"init.safetensors.rank{rank}.json").read_text())
        assert all(abs(f - 1 / RANKS) < 0.05 for f in share.values()), share
    # The teacher's shards, gathered, are the checkpoint's tensors (a tied head: the embeddings).
    saved = {}
    for file in model_dir.glob("*.safetensors"):
        saved.update(load_file(str(file)))
    if tied:
        saved["lm_head.weight"] = saved["model.embed_tokens.weight"]
    got_teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    assert got_teacher.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(got_teacher[name], tensor.float()), name


def test_training_from_the_streamed_setup_matches_a_teacher_loaded_whole(model_dir, tmp_path):
    streamed = _run(tmp_path, "streamed", model_dir, "train")
    whole = _run(tmp_path, "whole", model_dir, "train", "--whole")
    one, two = _log(tmp_path / "whole-work"), _log(tmp_path / "streamed-work")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "kl", "hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    a, b = load_file(str(whole)), load_file(str(streamed))
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, rtol=1e-4, atol=1e-6), name
    # Packed a decoder layer at a time while gathered: the packing of the whole gathered student.
    from littlebit.runtime.packed import pack_model
    from littlebit.training.distributed import student_skeleton

    student = student_skeleton(load_model(str(model_dir)), LB)
    student.load_state_dict(b)
    expected = pack_model(student).state_dict()
    packed = load_file(f"{streamed}.packed.safetensors")
    assert packed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(packed[name], tensor), name
    # Resumed from step 4 (its teacher and frozen tensors read again from the source): steps 5-6
    # give the unbroken run's weights.
    work = tmp_path / "streamed-work"
    args = ("train", "--resume-from", str(work / "dcp-global-000004"))
    c = load_file(str(_run(tmp_path, "resumed", model_dir, *args, work=work.name)))
    for name, tensor in b.items():
        assert torch.equal(c[name], tensor), name
    assert [r["step"] for r in _log(work)] == list(range(1, 7))


def test_train_command_streams_local_safetensors_unless_the_teacher_must_generate(model_dir, tmp_path):
    from littlebit.cli.train import sharded_source
    from littlebit.training.config import TrainConfig

    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    cfg = TrainConfig()
    assert sharded_source(str(model_dir), str(text), cfg) == model_dir
    assert sharded_source(str(model_dir), "generated", cfg) is None  # the teacher writes text whole
    assert sharded_source(str(model_dir), f"{text}:0.5,generated:0.5", cfg) is None
    assert sharded_source(str(tmp_path / "model.gguf"), str(text), cfg) is None
    assert sharded_source(str(tmp_path), str(text), cfg) is None  # no safetensors: loaded whole
    assert sharded_source(None, str(text), cfg) is None  # the default model is a GGUF file
    # rows weighted by the loss gradient: a backward pass through the whole teacher
    assert sharded_source(str(model_dir), str(text), TrainConfig(grad_power=0.5)) is None


def test_defaults_under_torchrun_keep_local_safetensors_shard_by_shard(model_dir, tmp_path, monkeypatch):
    from littlebit.cli.train import DEFAULT_GRAD_POWER, sharded_plan
    from littlebit.training import data_spec
    from littlebit.training.config import TrainConfig

    # beyond the split the default data mixes in generated text; the default init weights rows
    large = TrainConfig(steps=1000, batch_size=2, seqlen=512, grad_power=DEFAULT_GRAD_POWER)
    small = TrainConfig(steps=10, batch_size=2, seqlen=512, grad_power=DEFAULT_GRAD_POWER)
    model = str(model_dir)
    monkeypatch.setattr(data_spec, "default_data_dirs", lambda: [tmp_path / "data"])
    # no local corpus: generated text is the only default, so it stays and the teacher loads whole
    assert sharded_plan(model, None, large, False) == (None, large, None)
    (tmp_path / "data" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2-raw" / "wiki.valid.raw").write_text("text\n")
    data, cfg, source = sharded_plan(model, None, large, False)
    assert (data, cfg.grad_power, source) == (data_spec.DEFAULT_WITH_LOCAL_CORPUS, 0.0, model_dir)
    assert cfg == dataclasses.replace(large, grad_power=0.0)  # nothing else changes
    data, cfg, source = sharded_plan(model, None, small, False)  # the default reads no generated text
    assert (data, cfg.grad_power, source) == (None, 0.0, model_dir)
    # asked for: kept, and the teacher loads whole
    assert sharded_plan(model, "generated", large, False) == ("generated", large, None)
    assert sharded_plan(model, None, small, True) == (None, small, None)
    assert sharded_plan(None, None, large, False) == (None, large, None)  # the GGUF default model loads whole


def test_train_command_on_two_processes_builds_a_local_checkpoint_shard_by_shard(
    tiny_dir, tmp_path, monkeypatch
):
    """``littlebit train`` under torchrun on a safetensors directory takes the meta-device path
    (its log says so) and writes a loadable packed model."""
    from littlebit.hf.checkpoint import load_compressed

    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no evaluation text: no retries either
        monkeypatch.setenv(offline, "1")
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    cli = Path(__file__).parents[1] / "src" / "littlebit" / "cli" / "__main__.py"
    args = (
        "-v", "train", str(tiny_dir), "--out", str(out), "--data", str(text),
        "--bpw", "4", "--init", "dual-svid", "--grad-power", "0",
        "--steps", "2", "--seqlen", "16", "--batch-size", "2", "--block-sequences", "0",
        "--calib-sequences", "2", "--eval-every", "0", "--eval-windows", "1", "--eval-seqlen", "16",
        "--no-compile", "--threads", "1",
    )  # fmt: skip
    codes = _launch(tmp_path, "cli", *args, script=cli)
    log = (tmp_path / "cli-rank0.log").read_text()
    assert codes == [0] * RANKS, log[-3000:]
    assert f"reading each rank's shards of both models from {tiny_dir}" in log
    model = load_compressed(out)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "phi3"])
def test_layer_by_layer_initialisation_is_make_students_on_each_architecture(arch, tmp_path):
    """One process, no process group: the initialisation a decoder layer at a time from the files
    equals the whole-model one (fused q/k/v of Phi-3 included)."""
    from conftest import tiny_model

    from littlebit.training.distributed import student_skeleton
    from littlebit.training.sharded_init import init_student_streamed

    tiny_model(arch).save_pretrained(tmp_path / "m")
    teacher = load_model(str(tmp_path / "m"))
    calib = torch.randint(0, 256, (CALIB_SEQUENCES, 16), generator=torch.Generator().manual_seed(2))
    expected = make_student(teacher, LB, calib, 1.0, 0.5, progress=False).state_dict()
    with torch.device("meta"):
        student = student_skeleton(copy.deepcopy(teacher).to("meta"), LB)
    student.to_empty(device="cpu")
    init_student_streamed(student, tmp_path / "m", LB, calib, 1.0, 0.5, torch.device("cpu"), progress=False)
    got = student.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_models_the_layer_by_layer_path_cannot_build_are_loaded_whole(tmp_path):
    """Layers of several attention kinds (sliding and full), or buffers other than rotary
    frequencies (Gemma's embedding scale), send the run down the path that loads the model whole."""
    import transformers as tf
    from conftest import tiny_model

    from littlebit.cli.train import sharded_source
    from littlebit.hf.streaming import meta_skeleton
    from littlebit.training.config import TrainConfig
    from littlebit.training.sharded_init import unsupported

    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    sliding = tf.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )  # fmt: skip
    for name, model in (("gemma2", tiny_model("gemma2")), ("qwen2-sliding", tf.Qwen2ForCausalLM(sliding))):
        model.save_pretrained(tmp_path / name)
        assert unsupported(meta_skeleton(tmp_path / name)) is not None, name
        assert sharded_source(str(tmp_path / name), str(text), TrainConfig()) is None, name
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert unsupported(meta_skeleton(tmp_path / "llama")) is None
