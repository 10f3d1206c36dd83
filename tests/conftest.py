"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import transformers as tf

from littlebit.cli.main import main as cli_main
from littlebit.evaluation.data import default_data_dirs

VOCAB = 256

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)

ARCHITECTURES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, **_ATTN)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, **_ATTN)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, **_ATTN)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, **_ATTN, head_dim=16)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_COMMON, **_ATTN, head_dim=16)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, **_ATTN, head_dim=16)),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        )
    ),
    "phi3": lambda: tf.Phi3ForCausalLM(
        tf.Phi3Config(**_COMMON, **_ATTN, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ),
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch]().eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return tiny_model("llama")


def _wikitext2_reachable() -> bool:
    local = any((d / "wikitext-2-raw" / "wiki.test.raw").is_file() for d in default_data_dirs())
    return local or importlib.util.find_spec("datasets") is not None


# The perplexity tests need WikiText-2: the checkout's neighbour shared/data, $LITTLEBIT_DATA, or the
# hub through `datasets`. A clone with none of them skips them and says why (pytest -rs).
needs_wikitext2 = pytest.mark.skipif(
    not _wikitext2_reachable(),
    reason="no WikiText-2 here: put the checkout next to shared/data or set LITTLEBIT_DATA",
)


@pytest.fixture(scope="session")
def default_tokenizer_once():
    """The default model's tokenizer, built once a session: converting it from the GGUF file takes
    several seconds on 2 cores. Fixtures that hand it to a test give a copy."""
    from littlebit.hf.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def default_model_once():
    """The real default model, read once a session (tens of seconds from its GGUF file on 2 cores)."""
    from littlebit.hf.models import load_model

    torch.set_num_threads(2)  # the 2 cores of the CI machines, on which its reference numbers were taken
    return load_model(None)


@pytest.fixture
def default_model(default_model_once, default_tokenizer_once):
    """A fresh copy of the real default model and its tokenizer, free to convert, train or reconfigure."""
    return copy.deepcopy(default_model_once), copy.deepcopy(default_tokenizer_once)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer_once):
    """A tiny random Llama with the default model's tokenizer, saved like a hub checkpoint."""
    tokenizer = default_tokenizer_once  # only saved, never changed
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("tiny") / "model"
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compressed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    assert cli_main(["compress", str(tiny_dir), "--bpw", "2.0", "--out", str(out), "--dtype", "float32"]) == 0
    return out


def run_cli(capsys, *argv):
    """Exit code, stdout and stderr of the command; usage errors exit through SystemExit."""
    try:
        code = cli_main(list(argv))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def watch_recorded_steps(monkeypatch):
    """``watch(module)``: from then on, the ``GraphedMicroStep``s that ``module`` makes are listed in the
    returned list (to check that steps were replayed from a recording, not the eager fallback)."""

    def watch(module) -> list:
        made = []

        class Watched(module.GraphedMicroStep):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        monkeypatch.setattr(module, "GraphedMicroStep", Watched)
        return made

    return watch
