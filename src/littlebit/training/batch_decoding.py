"""Batched sampling from a causal LM with a static KV cache: one pass over the prompts, then decoding
steps of one token per sequence, each replayed on a GPU as one recorded CUDA graph.

The teacher writes its own training text (``teacher_text``) in batches of hundreds of sequences, and
decoding a small model that way is bound by the host, not the GPU: through transformers' ``generate``
the default model took 22-66 s for a shard of 256 sequences x 512 tokens on an H100, 43 ms or more a
step (2,450 tokens/s over 871k tokens, ``benchmarks/results/generate_pipeline_h100.txt``), where a
step's arithmetic needs a few ms. A recorded step issues all of its kernels at once.

For one recording to serve every step, everything that changes between steps lives in device tensors
that the step itself advances: the slot of the token it feeds, each row's position (prompts are
left-padded), and the attention mask, handed to the model as a ready 4-D mask so that transformers
builds none. Rows go on sampling after their end token (callers cut there); every ``CHECK_EVERY``
steps the host checks whether all have ended. On the CPU, or where recording fails, the same step
runs eagerly.

Under a mask, transformers 5.17's sdpa copies each layer's cached keys and values once per query head
of a group (``repeat_kv``) on every step, a cost that grows with the cache: about 18 GB a step for
256 rows of 512 slots of the default model. With sdpa the loop's steps therefore run each key/value
head's group of queries as the rows of one product against the cache itself (``_grouped_sdpa``),
which transformers 5.25 does itself for single-token steps, with the same result.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from littlebit.config import LittleBitError
from littlebit.runtime.step_graph import GraphedMicroStep
from littlebit.training.sampling import sample_nucleus

CHECK_EVERY = 16
GROUPED_SDPA = "littlebit_grouped_sdpa"  # the attention implementation the loop runs under sdpa


def sample_batch(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    length: int,
    temperature: float,
    top_p: float,
    eos: int | None,
    graphs: bool | None = None,
) -> torch.Tensor:
    """(B, n) tokens: the prompts ``ids`` (B, L; left-padded, ``mask`` 0 on the padding, both on the
    model's device), then tokens drawn from softmax(logits / ``temperature``) within the ``top_p``
    nucleus, up to ``length`` in all (at least one new token), or fewer once every row has drawn
    ``eos``. ``graphs``: record the decoding step as a CUDA graph (default: on a GPU)."""
    total = max(length, ids.shape[1] + 1)
    with _grouped_attention(model):
        decoder = _Decoder(model, ids, mask, total, temperature, top_p, eos)
        graphs = ids.is_cuda if graphs is None else graphs
        step = GraphedMicroStep(decoder.step, what="decoding step") if graphs else decoder.step
        tick = torch.zeros(1, device=ids.device)  # the recorded step's (unused) input
        slot = ids.shape[1]  # the host's copy of ``decoder.slot``
        while slot < total - 1:
            step(tick)
            slot += 1
            if (slot - ids.shape[1]) % CHECK_EVERY == 0 and bool(decoder.ended.all()):
                break
    return decoder.out[:, : slot + 1]


@contextmanager
def _grouped_attention(model: nn.Module):
    """Within: a model on sdpa runs ``_grouped_sdpa``; other implementations are left alone."""
    config = model.config
    before = getattr(config, "_attn_implementation", "sdpa")
    if before != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before


def _grouped_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, except for one query token a row: then the group of query heads
    that shares a key/value head forms the rows of one product against that head's cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    groups = getattr(module, "num_key_value_groups", 1)
    plain = dropout == 0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    if query.shape[2] != 1 or groups == 1 or not (plain and shared_mask):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, heads // groups, groups, dim)
    # the (rows, 1, 1, slots) mask broadcasts over the key/value heads and their groups
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


class _Decoder:
    """The state of one batch's decoding, advanced in place by ``step``."""

    def __init__(self, model, ids, mask, total: int, temperature: float, top_p: float, eos) -> None:
        from transformers import StaticCache

        attention = getattr(model.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager", GROUPED_SDPA):
            raise LittleBitError(f"sampling needs sdpa or eager attention, not {attention!r}")
        B, L = ids.shape
        dev = ids.device
        self.model, self.temperature, self.top_p, self.eos = model, temperature, top_p, eos
        # the forward's cache argument: ``cache`` in transformers 5.25, ``past_key_values`` in 5.17
        names = inspect.signature(type(model).forward).parameters
        self.cache_arg = "cache" if "cache" in names else "past_key_values"
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        self.out = torch.zeros(B, total, dtype=torch.long, device=dev)
        self.out[:, :L] = ids
        mask = mask.to(dev).bool()
        self.valid = torch.ones(B, total, dtype=torch.bool, device=dev)  # keys that are not padding
        self.valid[:, :L] = mask
        self.keys = torch.arange(total, device=dev)
        # sdpa takes a boolean mask (True: attend); eager attention adds it to the scores
        self.boolean = attention != "eager"
        self.dtype = next(model.parameters()).dtype
        self.ended = torch.zeros(B, dtype=torch.bool, device=dev)
        # The prompts: each token attends to its row's earlier real tokens; a padding token attends
        # to itself only, which keeps its states finite (no real token ever attends to it).
        queries = torch.arange(L, device=dev)
        allowed = (self.keys[None, :] <= queries[:, None])[None] & self.valid[:, None, :]
        allowed[:, queries, queries] = True
        positions = mask.long().cumsum(-1) - 1
        positions.masked_fill_(~mask, 1)  # what ``generate`` gives left padding
        logits = self._forward(ids, self._mask(allowed[:, None]), positions)
        self.slot = torch.tensor(L, device=dev)  # where the token the next step feeds sits
        self.position = positions[:, -1:] + 1  # that token's position in its row
        self.mask = self._step_mask()  # the step's mask, rewritten in place by each step
        self._emit(sample_nucleus(logits, temperature, top_p))

    def _step_mask(self) -> torch.Tensor:
        """What the token at ``slot`` attends to: its row's real tokens up to itself."""
        return self._mask(self.valid[:, None, None, :] & (self.keys <= self.slot))

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.boolean:
            return allowed
        scores = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return scores.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
        )
        return out.logits[:, -1]

    def _emit(self, token: torch.Tensor) -> None:
        self.out.index_copy_(1, self.slot.view(1), token[:, None])
        if self.eos is not None:
            self.ended |= token == self.eos

    def step(self, _tick: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Feed the token at ``slot``, draw the next one into ``slot + 1``."""
        token = self.out.index_select(1, self.slot.view(1))
        self.mask.copy_(self._step_mask())
        logits = self._forward(token, self.mask, self.position)
        self.slot += 1
        self.position += 1
        self._emit(sample_nucleus(logits, self.temperature, self.top_p))
        return {}
