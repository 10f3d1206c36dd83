"""Training text the teacher writes itself (LLM-QAT, arXiv 2305.17888), cached on disk as token shards.

A cache folder is keyed by a hash of the model's identity and every setting that shapes the text
(``TextGenConfig``, the start prompts). It holds ``settings.json`` and ``shard-NNNNN.safetensors``
files, each one batched sampling call of ``batch_size`` sequences of up to ``length`` tokens, each
cut after its end-of-sequence token: ``tokens``, the documents end to end (1-D int32), and
``lengths``, one per document; its metadata holds the token count and their SHA-256, checked when
the shard is read. Past its end token a model only repeats it, so nothing after it is
kept. Shard ``k`` depends only on the key and ``k``, so an interrupted generation resumes at the first
missing shard and ends with the same files as one never stopped, and a larger request appends to a
smaller. Every file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from littlebit.atomic import make_parents, os_error_message, remove_stale_temporaries
from littlebit.config import LittleBitError
from littlebit.hf.models import context_length
from littlebit.training.batch_decoding import sample_batch
from littlebit.training.config import TextGenConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT = 4  # raised whenever the same settings would write other text (the sampler among them)
_SHARD = "shard-{:05d}.safetensors"
_PLACEHOLDER = "\x00littlebit\x00"


def default_cache_dir() -> Path:
    """``$LITTLEBIT_CACHE/generated``, else ``~/.cache/littlebit/generated``."""
    root = os.environ.get("LITTLEBIT_CACHE") or Path.home() / ".cache" / "littlebit"
    return Path(root) / "generated"


# The static caches of one shard's batch may take this much GPU memory. A step's cost grows far less
# than its batch (on an H100, bf16, the default model's shape: 6.9 ms a step for 256 sequences, 10.0
# for 512, 15.9 for 1024; benchmarks/results/decode_profile_h100.json), so the batch is as large as
# this allows, within [8, 1024]. A chat start's answer pass can hold up to twice the length (the
# question, then the answer), so that is what a sequence is counted for. The default model in bf16:
# 512 sequences, 11.3 GiB at most; Llama-2-7B in bf16: 32.
GPU_CACHE_BYTES = 16 * 2**30


def resolved(config: TextGenConfig, device: torch.device, model: nn.Module | None = None) -> TextGenConfig:
    """The settings with the device-dependent defaults filled in, so that they key the cache: the
    sampling dtype (on a GPU bfloat16 unless the model is already in 16 bits, elsewhere the model's
    own) and the batch (on a GPU the power of
    two whose static caches in that dtype fit ``GPU_CACHE_BYTES``, from the model's config, so it is
    the same on every GPU; 32 on a CPU, where a decoding step reads every weight once whatever the
    batch, so a larger batch is nearly free up to there)."""
    if config.dtype is None:
        own = next(model.parameters()).dtype if model is not None else torch.float32
        half = own in (torch.bfloat16, torch.float16)
        dtype = own if device.type != "cuda" or half else torch.bfloat16
        config = dataclasses.replace(config, dtype=str(dtype).removeprefix("torch."))
    if config.batch_size is not None:
        return config
    if device.type != "cuda":
        return dataclasses.replace(config, batch_size=32)
    element = getattr(torch, config.dtype).itemsize
    per_sequence = _cache_bytes_per_sequence(model, 2 * config.length, element) if model is not None else None
    if not per_sequence:
        return dataclasses.replace(config, batch_size=256)
    fits = max(1, GPU_CACHE_BYTES // per_sequence)
    return dataclasses.replace(config, batch_size=max(8, min(1024, 1 << (fits.bit_length() - 1))))


def _cache_bytes_per_sequence(model: nn.Module, length: int, element: int) -> int | None:
    """Bytes of keys and values one sequence of ``length`` tokens holds in elements of ``element``
    bytes, from a Llama-like config."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * element * layers * kv_heads * head_dim * length


def sampling_twin(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself if it is in ``dtype``, else a copy whose parameters are cast to it (tied ones
    stay tied; buffers are copied as they are, so rotary frequencies keep their precision). The copy
    costs the parameters' size in ``dtype``; the model is left untouched."""
    params = list(model.parameters())
    if all(p.dtype == dtype for p in params if p.is_floating_point()):
        return model
    memo = {}
    for p in params:
        if id(p) not in memo:
            cast = p.detach().to(dtype) if p.is_floating_point() else p.detach()
            memo[id(p)] = nn.Parameter(cast, requires_grad=False)
    return copy.deepcopy(model, memo)


def model_identity(model: nn.Module) -> dict:
    """What tells models apart: architecture, config, and a rounded fingerprint of every parameter.

    Per tensor, the sum and the sum of squares in float64, rounded to 9 digits so that the summation
    order of another device does not change the key.
    """
    with torch.no_grad():
        stats = torch.stack(
            [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
        ).cpu()
    digest = hashlib.sha256(" ".join(f"{x:.9g}" for x in stats.flatten().tolist()).encode())
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    return {
        "class": type(model).__name__,
        "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "parameters": digest.hexdigest(),
        "dtype": str(next(model.parameters()).dtype),
    }


def start_prompts(tokenizer: PreTrainedTokenizerBase, config: TextGenConfig) -> dict[str, list[int]]:
    """The token ids each start kind begins with (``random`` adds one random token per sequence)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: dict[str, list[int]] = {}
    for kind in config.starts:
        if kind in ("bos", "random"):
            if bos is not None or kind == "random":
                out[kind] = [] if bos is None else [int(bos)]
        elif kind == "chat" and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False)
            if _PLACEHOLDER in text:
                prefix = text[: text.index(_PLACEHOLDER)]
                out[kind] = tokenizer(prefix, add_special_tokens=False).input_ids
    if not out:
        raise LittleBitError(f"the tokenizer can make none of the starts {', '.join(config.starts)}")
    too_long = [k for k, ids in out.items() if len(ids) + 1 >= config.length]
    if too_long:
        raise LittleBitError(f"generated length {config.length} leaves no room after the {too_long[0]} start")
    return out


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the chat template puts after the end token of a user's message, before the
    assistant's answer (``\\n<|im_start|>assistant\\n`` for ChatML templates)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    if _PLACEHOLDER not in text:
        return []
    ids = tokenizer(text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :], add_special_tokens=False).input_ids
    # The user's turn ends with the end token the model writes itself; the header is what follows it.
    if tokenizer.eos_token_id in ids:
        ids = ids[ids.index(tokenizer.eos_token_id) + 1 :]
    return ids


class TextCache:
    """One keyed folder of generated shards for a model, a tokenizer and settings."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: TextGenConfig,
        root: str | Path | None = None,
        record_steps: bool | None = None,
    ) -> None:
        """``record_steps``: replay each decoding step as a CUDA graph (default: on a GPU)."""
        self.model, self.tokenizer = model, tokenizer
        # the model as it samples, in the sampling dtype, while ``_sampling`` holds it
        self._twin: nn.Module | None = None
        self.record_steps = record_steps
        self.device = next(model.parameters()).device
        context = context_length(model)
        if context is not None and config.length > context:
            raise LittleBitError(
                f"generated length {config.length} exceeds the model's {context}-token context"
            )
        self.config = resolved(config, self.device, model)
        self.prompts = start_prompts(tokenizer, self.config)
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.pad = pad if pad is not None else 0
        self.assistant = assistant_header(tokenizer) if "chat" in self.prompts else []
        self.kinds = list(self.prompts)
        special = set(tokenizer.all_special_ids)
        self.vocab = [i for i in range(min(len(tokenizer), _vocab(model))) if i not in special]
        self.settings = {
            "format": FORMAT,
            "model": model_identity(model),
            "generation": dataclasses.asdict(self.config),
            "prompts": self.prompts,
            "eos": self.eos,
            "assistant": self.assistant,
        }
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root if root is not None else default_cache_dir()) / key

    def shard_path(self, index: int) -> Path:
        return self.dir / _SHARD.format(index)

    def available(self) -> int:
        """Complete shards on disk, counted from the first (a gap ends the count)."""
        n = 0
        while self.shard_path(n).is_file():
            n += 1
        return n

    def shard_tokens(self, index: int) -> int:
        """Tokens in shard ``index``, from its header."""
        path = self.shard_path(index)
        try:
            with safe_open(str(path), "pt") as f:
                return int(f.metadata()["tokens"])
        except (SafetensorError, KeyError, OSError, TypeError, ValueError) as e:
            raise LittleBitError(f"damaged shard {path}: delete it and generate again") from e

    def tokens_available(self) -> int:
        return sum(self.shard_tokens(i) for i in range(self.available()))

    def ensure(
        self, tokens: int, progress: Callable[[int, int, float], None] | None = None, limit: int | None = None
    ) -> int:
        """Generate shards until the cache holds ``tokens``; returns the shards there now.

        ``progress(tokens_there, tokens, seconds_for_the_last_shard)`` is called after each new
        shard; ``limit`` stops after that many new shards (the rest is left for a later call).
        """
        new_dirs: list[Path] = []
        done = 0
        try:
            new_dirs = make_parents(self.dir)  # deepest first; the outermost goes if it ends with nothing
            self._write_settings()
            done = self.available()
            have = self.tokens_available()
            made = 0
            # one sampling copy of the teacher for all the shards this call writes
            with self._sampling() if have < tokens else contextlib.nullcontext():
                while have < tokens and (limit is None or made < limit):
                    t0 = time.perf_counter()
                    stream, lengths = self.sample_shard(done)
                    self._write_shard(done, stream, lengths)
                    done, made, have = done + 1, made + 1, have + stream.numel()
                    if progress is not None:
                        progress(have, tokens, time.perf_counter() - t0)
        except BaseException as e:
            if new_dirs and done == 0:  # folders this call made and filled with nothing: leave no trace
                shutil.rmtree(new_dirs[-1], ignore_errors=True)
            if isinstance(e, OSError):  # the cache's disk or folder, which the user chose
                raise LittleBitError(os_error_message(e, f"generated text to {self.dir}")) from e
            raise
        return done

    def load(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` generated tokens as one 1-D int64 stream (documents end to end)."""
        parts, have = [], 0
        for i in range(self.available()):
            if have >= tokens:
                break
            parts.append(self._read_tokens(self.shard_path(i)))
            have += parts[-1].numel()
        if have < tokens:
            raise LittleBitError(f"{self.dir} holds {have} of the {tokens} generated tokens needed")
        return torch.cat(parts).to(torch.int64)[:tokens]

    # ----- sampling -----------------------------------------------------------------------------
    def sample_shard(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``index`` (documents end to end, and their lengths), a pure function of the key and
        ``index``. A chat start takes two turns: the model writes the user's message, then, after the
        template's assistant header, the answer."""
        cfg = self.config
        kind = self.kinds[index % len(self.kinds)]
        seed = (cfg.seed * 1_000_003 + index) % 2**64  # a generator takes at most 2^64 - 1
        prefix = torch.tensor(self.prompts[kind], dtype=torch.int64).expand(cfg.batch_size, -1)
        if kind == "random":
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randint(len(self.vocab), (cfg.batch_size, 1), generator=gen)
            prefix = torch.cat([prefix, torch.tensor(self.vocab)[pick]], dim=1)
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with self._sampling() as twin, torch.random.fork_rng(devices=devices):
                twin.eval()
                torch.manual_seed(seed)
                docs = self._documents(self._generate(prefix, cfg.length), prefix.shape[1])
                if kind == "chat" and self.assistant:
                    docs = self._answers(docs)
        finally:
            self.model.train(was_training)
        lengths = torch.tensor([d.numel() for d in docs], dtype=torch.int32)
        return torch.cat(docs).to(torch.int32).contiguous(), lengths

    @contextlib.contextmanager
    def _sampling(self) -> Iterator[nn.Module]:
        """Within: ``self._twin``, the model as it samples (``sampling_twin``), made by the outermost
        ``with`` and dropped as it ends."""
        if self._twin is not None:
            yield self._twin
            return
        dtype = self.config.dtype
        try:
            self._twin = sampling_twin(self.model, getattr(torch, dtype))
        except torch.OutOfMemoryError as e:
            raise LittleBitError(
                f"no memory for a {dtype} copy of the teacher to sample with: sample in the teacher's "
                "own dtype (train --gen-dtype, generate-data --dtype)"
            ) from e
        try:
            yield self._twin
        finally:
            self._twin = None

    def _answers(self, questions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each finished user turn, then the assistant header and the model's answer (within ``length``)."""
        length, header = self.config.length, torch.tensor(self.assistant, dtype=torch.int64)
        finished = [int(q[-1]) == self.eos and len(q) + len(header) < length for q in questions]
        done = [q for q, f in zip(questions, finished, strict=True) if not f]
        asked = [torch.cat([q, header]) for q, f in zip(questions, finished, strict=True) if f]
        if not asked:
            return questions
        # Left-padded to one length: the answers then start at the same column for every row.
        width = max(len(q) for q in asked)
        ids = torch.full((len(asked), width), self.pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(asked):
            ids[i, width - len(q) :], mask[i, width - len(q) :] = q, 1
        # Room for the shortest prompt to reach ``length``; longer ones are cut to it afterwards.
        rows = self._generate(ids, length + width - min(len(q) for q in asked), mask)
        out = []
        for i, q in enumerate(asked):
            answer = self._documents(rows[i : i + 1, width:], 0)[0][: length - len(q)]
            out.append(torch.cat([q, answer]))
        # Sequences keep their order: the finished questions where they were, the answered ones after.
        return done + out

    def _generate(self, ids: torch.Tensor, length: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        mask = torch.ones_like(ids) if mask is None else mask
        # No autocast: under bf16 autocast on the H200 (transformers 5.17) the static cache, held in
        # the fp32 model's dtype, refused the bf16 keys and values (an index_copy_ dtype mismatch).
        with torch.no_grad():
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = sample_batch(
                self._twin, ids, mask, length, cfg.temperature, cfg.top_p, self.eos, self.record_steps
            )
        return out.cpu()

    def _documents(self, rows: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Each row up to and including its first end token after the prompt (or all ``length``)."""
        docs = []
        for row in rows[:, : self.config.length]:
            ends = (row[start:] == self.eos).nonzero() if self.eos is not None else row[:0]
            docs.append(row[: start + int(ends[0]) + 1] if len(ends) else row)
        return docs

    # ----- files -------------------------------------------------------------------------------
    def _write_settings(self) -> None:
        path = self.dir / "settings.json"
        if path.is_file():
            if json.loads(path.read_text()) != json.loads(json.dumps(self.settings)):
                raise LittleBitError(f"{self.dir} holds text generated with other settings: remove it")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.settings, indent=1)))

    def _read_tokens(self, path: Path) -> torch.Tensor:
        """A shard's tokens, refused unless they are what was written (shards written without a
        digest: at least every id in the model's vocabulary)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta, tokens = f.metadata() or {}, f.get_tensor("tokens")
        except (SafetensorError, KeyError, OSError) as e:
            raise LittleBitError(f"damaged shard {path}: delete it and generate again") from e
        digest = meta.get("sha256")
        altered = meta.get("tokens") != str(tokens.numel()) or (
            digest is not None and digest != _token_digest(tokens)
        )
        if altered or (
            tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < _vocab(self.model)
        ):
            raise LittleBitError(f"shard {path} was altered or damaged: delete it and generate again")
        return tokens

    def _write_shard(self, index: int, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        meta = {
            "index": str(index),
            "start": self.kinds[index % len(self.kinds)],
            "tokens": str(tokens.numel()),
            "sha256": _token_digest(tokens),
        }
        tensors = {"tokens": tokens, "lengths": lengths}
        _atomic_write(self.shard_path(index), lambda tmp: save_file(tensors, str(tmp), meta))


def _token_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def _vocab(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary sibling named for this process, renamed into place once complete; the
    temporaries of killed writers are removed first."""
    remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-0")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
