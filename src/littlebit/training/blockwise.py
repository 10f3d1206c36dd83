"""Block-by-block reconstruction: fit each student decoder layer to the teacher's, one at a time.

Before global distillation, each compressed decoder layer is trained on its own to reproduce the
teacher layer's output on calibration sequences. Every optimizer step then touches one layer only,
so per token of data it gets about as many steps as there are layers: cheap progress from a poor
start. The student layer reads the *student's* previous output (``inputs="student"``), so each
layer also learns to undo the error the layers before it left; ``"teacher"`` feeds it the teacher's
input instead.

The token cost is counted as ``sequences x seqlen x epochs``: every layer sees each calibration
token once per epoch, which adds up to one full forward and backward pass per token per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from littlebit.config import LittleBitError
from littlebit.core.convert import decoder_layer_classes
from littlebit.runtime.step_graph import GraphedMicroStep
from littlebit.training.compiled import compile_layer
from littlebit.training.config import BlockConfig, LearningRates
from littlebit.training.optim import (
    lr_factor,
    make_optimizer,
    param_groups,
    select_trainable,
    set_lr,
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the ModuleList whose items are its decoder-layer class)."""
    classes = decoder_layer_classes(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in classes:
            return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LittleBitError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=len)


class _Captured(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering decoder layer 0 and the keyword arguments the model passes it.

    The arguments (rotary embeddings, mask, positions) depend only on the batch's shape, so one
    capture serves every batch of the same shape. The forward stops at layer 0.
    """
    layer0 = decoder_layers(model)[0]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(batch, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise LittleBitError("could not capture the inputs of the first decoder layer")
    return seen["x"], seen["kwargs"]


def layer_output(out: torch.Tensor | tuple | list) -> torch.Tensor:
    """The hidden states a decoder layer returns (transformers' layers return a tuple or a tensor)."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def _run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int, amp) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], batch_size):
        with amp():
            out[i : i + batch_size] = layer_output(layer(x[i : i + batch_size], **kwargs)).to(out.dtype)
    return out


def reconstruct_blocks(
    teacher: nn.Module,
    student: nn.Module,
    sequences: torch.Tensor,
    config: BlockConfig,
    lrs: LearningRates,
    amp: Callable,
    train_norms: bool = True,
    start_block: int = 0,
    on_block_done: Callable[[int, float], None] | None = None,
    progress: bool = True,
    cuda_graphs: bool = False,
    compiled: bool = False,
) -> None:
    """Train student layers ``start_block..`` one at a time (earlier ones are replayed, not trained).

    ``amp()`` returns the autocast context to run under; ``on_block_done(index, final_loss)`` is
    called after each trained layer (the trainer checkpoints there). ``cuda_graphs`` replays each
    layer's forward and backward as a CUDA graph (``step_graph``): a one-layer step is a few hundred
    small kernels, so issuing them from Python, not the GPU, set the pace. ``compiled``: each layer is
    ``torch.compile``d before it trains, which fuses them (``compiled.compile_layer``).
    """
    device = next(student.parameters()).device
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    bs = config.batch_size
    xs, kwargs = [], None
    for i in range(0, sequences.shape[0], bs):
        x, kw = first_layer_inputs(teacher, sequences[i : i + bs].to(device))
        xs.append(x.float())
        kwargs = kwargs if kwargs is not None else kw
    x_t = torch.cat(xs)
    x_s = x_t.clone()
    steps_per_epoch = (x_t.shape[0] + bs - 1) // bs
    total = steps_per_epoch * config.epochs
    bar = tqdm(total=len(s_layers) - start_block, desc="block reconstruction", disable=not progress)
    for index, (t_layer, s_layer) in enumerate(zip(t_layers, s_layers, strict=True)):
        y_t = _run_layer(t_layer, x_t, kwargs, bs, amp)
        if index >= start_block and total > 0:
            loss = fit_layer(
                s_layer,
                x_t if config.inputs == "teacher" else x_s,
                y_t,
                kwargs,
                config,
                lrs,
                amp,
                train_norms,
                index,
                total,
                cuda_graphs=cuda_graphs,
                compiled=compiled,
            )
            bar.update(1)
            bar.set_postfix(layer=index, rel_err=f"{loss:.4f}")
        x_s = _run_layer(s_layer, x_s, kwargs, bs, amp)
        x_t = y_t
        if index >= start_block and on_block_done is not None:
            on_block_done(index, loss if total > 0 else float("nan"))
    bar.close()


def fit_layer(
    layer: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    kwargs: dict,
    config: BlockConfig,
    lrs: LearningRates,
    amp: Callable,
    train_norms: bool,
    index: int,
    total: int,
    cuda_graphs: bool,
    compiled: bool = False,
) -> float:
    """Fit one student layer to map ``x`` to the teacher's outputs ``y``: ``config.epochs`` passes in
    batches of ``config.batch_size``, the learning rate scheduled over ``total`` steps, the order
    seeded by ``index``; returns the last step's relative error."""
    if compiled:
        compile_layer(layer)
    kinds = select_trainable(layer, train_norms)
    m = config.lr_multiplier
    scaled = LearningRates(lrs.latent * m, lrs.scale * m, lrs.norm * m, lrs.relative)
    optimizer = make_optimizer(param_groups(kinds, scaled))
    warmup = int(config.warmup_frac * total)
    n, bs = x.shape[0], config.batch_size
    # A fixed, seeded order per layer keeps the run reproducible and resumable block by block.
    gen = torch.Generator().manual_seed(1_000 + index)

    def forward_backward(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        with amp():
            out = layer_output(layer(x[idx], **kwargs)).float()
        target = y[idx]
        # Over the whole batch: from decoder layer 11 to 27 of the default model's 30 the first
        # position's massive activations hold 72-98 % of |target|^2 (benchmarks/dev/hidden_norms.py), so
        # there this fits that token first; counting tokens alike lost (docs/recipe.md).
        loss = (out - target).square().sum() / target.square().sum().clamp_min(1e-12)
        loss.backward()
        return {"loss": loss.detach()}

    # A recorded step needs one batch shape, and gradients that stay allocated (zeroed in place).
    graphed = cuda_graphs and x.device.type == "cuda" and n % bs == 0
    micro = GraphedMicroStep(forward_backward) if graphed else forward_backward
    step, last = 0, float("nan")
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen).to(x.device)  # one copy per epoch, not per step
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            set_lr(optimizer, lr_factor(step, total, warmup))
            optimizer.zero_grad(set_to_none=not graphed)
            loss = micro(idx)["loss"]
            optimizer.step()
            last = loss.item() if step == total - 1 else last
            step += 1
    del micro  # frees the recorded graph's memory pool before the next layer records its own
    for p in layer.parameters():
        p.grad = None  # a stale gradient would leak into the next phase's first step
        p.requires_grad_(False)
    return last
