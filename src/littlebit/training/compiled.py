"""Decoder layers compiled for training's recorded steps.

A training step of the default model is launch-bound even when recorded as a CUDA graph: a global step's
graph replays ~16,000 small kernels. ``torch.compile`` fuses them into ~6,000: the recorded global step
of 2 x 512 tokens took 23.5 ms against 44.5 ms eager on an H100, a block-stage step 1.64 against 2.43 ms
(``benchmarks/results/train_profile_b2_h100.json``, ``block_stage_speed_h100.json``).

Compiled code guards on what it was compiled for and compiles again when that changes. A CUDA graph
cannot be recorded while something compiles, so every call that is recorded must meet code compiled
before: the steps get an attention mask of their own (``causal_mask``), and evaluations, whose shapes
and modes differ from the steps', run the layers' plain code (``eager_layers``). After training the
layers are plain again (``uncompile_layers``), so the model the caller gets back does not compile on
its first calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def compile_layers(layers: Iterable[nn.Module]) -> None:
    """``torch.compile`` each of a model's decoder layers in place. Every layer runs the same code on
    same-shaped tensors, so one compilation serves all of them and every student of the same ranks,
    where compiling the whole model would compile again for each new student."""
    for layer in layers:
        compile_layer(layer)


def compile_layer(layer: nn.Module) -> None:
    """``torch.compile`` one layer in place, unless it is already. Compilation errors fall back to eager
    execution instead of failing the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if getattr(layer, "_compiled_call_impl", None) is None:
        layer.compile()


def uncompile_layers(layers: Iterable[nn.Module]) -> None:
    """Undo ``compile_layers``: each layer calls its own forward again."""
    for layer in layers:
        layer._compiled_call_impl = None


@contextmanager
def eager_layers(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Within: the layers run their plain code; their compiled code is kept for after."""
    layers = list(layers)
    kept = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    uncompile_layers(layers)
    try:
        yield
    finally:
        for layer, compiled in zip(layers, kept, strict=True):
            layer._compiled_call_impl = compiled


def causal_mask(model: nn.Module, seqlen: int, device: torch.device) -> torch.Tensor | None:
    """A ready (1, 1, seqlen, seqlen) causal mask for ``model``'s attention (boolean for sdpa, additive
    for eager), which transformers passes on as it is; None for other attention implementations and
    for models whose layers see less than the whole sequence (a sliding window shorter than it), whose
    masks a plain causal one would not describe.

    transformers (5.17) builds a full causal mask while a CUDA graph is being recorded and none outside
    one (sdpa's causal flag instead), so compiled layers met a mask for the first time in the recording
    step, compiled again there, and the recording failed. A mask of the caller's is the same every step.
    """
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < seqlen:
        return None
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()[None, None]
    if attention == "sdpa":
        return allowed
    if attention == "eager":
        dtype = next(model.parameters()).dtype
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return blocked.masked_fill_(~allowed, torch.finfo(dtype).min)
    return None
