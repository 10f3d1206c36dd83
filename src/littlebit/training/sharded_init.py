"""Filling a sharded teacher and student from a safetensors checkpoint; no process holds either whole.

Both models are built on the meta device and sharded with FSDP2 before any weight exists
(``Distributed`` with a ``source``); ``to_empty`` then gives every rank its local shards, still
uninitialised, and this module fills them:

- ``fill_from_checkpoint``: every rank reads only its own slice of each tensor from the safetensors
  files (the teacher, and the student's embeddings, norms and head, which are the teacher's in fp32).
- ``init_student_streamed``: the LittleBit layers. Rank 0 walks the decoder layers in order holding
  one teacher layer and the calibration hidden states; it records each linear's input RMS over the
  calibration tokens (the statistic ``input_rms`` computes on the whole model), converts the layer
  with the seeds of the whole-model ``convert`` and rescales its latents, so the result is
  ``make_student``'s; each tensor is broadcast and every rank keeps its chunk. The hidden states
  then move on through the teacher layer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.calibrate import InputSquares, scale_function
from littlebit.core.convert import (
    checked_plan,
    convert_module,
    decoder_block_names,
    set_submodule,
    targets_by_module,
)
from littlebit.hf.shards import SafetensorsCheckpoint
from littlebit.hf.streaming import meta_skeleton
from littlebit.training.blockwise import decoder_layers, first_layer_inputs, layer_output
from littlebit.training.student import rescale_latents

# Batches of calibration sequences per forward, as ``input_rms`` runs them: the same batches give
# the same kernels, hence the same statistics bit for bit.
CALIB_BATCH = 8


def local_index(param: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the full tensor that this rank's shard of ``param`` holds (all of a plain tensor)."""
    if not isinstance(param, DTensor):
        return tuple(slice(None) for _ in param.shape)
    # torch's own placement arithmetic (a private module); ``_checked`` compares every slice it
    # gives with the local shard's shape, so a change there is refused, not copied wrongly.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def local_shard(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _checked(local: torch.Tensor, part: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(part.shape) != tuple(local.shape):
        raise LittleBitError(
            f"{name}: slice {tuple(part.shape)} does not match the shard {tuple(local.shape)}"
        )
    return part


def read_slice(checkpoint: SafetensorsCheckpoint, name: str, index: tuple[slice, ...]) -> torch.Tensor:
    """``checkpoint[name][index]`` without reading the rest of the tensor."""
    from safetensors import safe_open

    entry = checkpoint.entries[name]
    if not entry.shape:
        return checkpoint.read(name)
    # Opened per tensor: the mapping, and the pages it touched, go when the file is closed.
    with safe_open(str(entry.file), framework="pt") as f:
        return f.get_slice(name)[index]


def checkpoint_names(model: nn.Module, checkpoint: SafetensorsCheckpoint) -> dict[str, str]:
    """``{parameter or buffer name: the checkpoint name holding it}``; a tied tensor (a head sharing
    the embeddings) is read under the name of whichever of its group the checkpoint holds."""
    groups: dict[int, list[str]] = {}
    for name, p in [*model.named_parameters(remove_duplicate=False), *_persistent_buffers(model)]:
        groups.setdefault(id(p), []).append(name)
    found = {}
    for names in groups.values():
        stored = [n for n in names if n in checkpoint]
        if stored:
            found.update(dict.fromkeys(names, stored[0]))
    return found


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, module in model.named_modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, b))
    return out


@torch.no_grad()
def fill_from_checkpoint(
    model: nn.Module, checkpoint: SafetensorsCheckpoint, skip: tuple[str, ...] = ()
) -> list[str]:
    """Copy each parameter's and persistent buffer's local shard from ``checkpoint``, in its dtype.

    Names starting with a prefix in ``skip`` are left alone; returns the names not in the checkpoint.
    """
    sources = checkpoint_names(model, checkpoint)
    missing = []
    for name, p in [*model.named_parameters(), *_persistent_buffers(model)]:
        if skip and name.startswith(skip):
            continue
        if name not in sources:
            missing.append(name)
            continue
        local = local_shard(p)
        if local.numel() == 0:
            continue
        part = read_slice(checkpoint, sources[name], local_index(p))
        local.copy_(_checked(local, part, name).to(local.dtype))
    return missing


def unsupported(model: nn.Module) -> str | None:
    """Why the meta-device path cannot build ``model`` (a meta-device skeleton), or None.

    Its layers must all take the same attention inputs (the calibration pass hands every layer those
    captured at the first), and every buffer ``to_empty`` loses must be rotary frequencies, the one
    kind rebuilt from the config.
    """
    kinds = set(getattr(model.config, "layer_types", None) or [])
    if len(kinds) > 1:
        return f"its layers are of {len(kinds)} attention kinds ({', '.join(sorted(map(str, kinds)))})"
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set and not hasattr(module, "inv_freq"):
            return f"{name} holds buffers that cannot be rebuilt from the config"
    return None


def rebuild_rotary(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers ``to_empty`` left uninitialised (rotary frequencies,
    used where the layers compute), by building their modules again from the model's config."""
    for name, module in list(model.named_modules()):
        if module._non_persistent_buffers_set:
            if not hasattr(module, "inv_freq"):
                raise LittleBitError(f"{name} holds buffers that cannot be rebuilt from the config")
            with torch.device(device):
                set_submodule(model, name, type(module)(model.config))


def _teacher_layer(plain: nn.Module, name: str, checkpoint: SafetensorsCheckpoint, device) -> nn.Module:
    """Layer ``name`` of the meta-device ``plain`` model, read whole in float32 onto ``device``."""
    block = plain.get_submodule(name)
    prefix = name + "."
    state = {}
    for n in block.state_dict(prefix=prefix):
        entry = checkpoint.entries[n]
        state[n.removeprefix(prefix)] = checkpoint.read(
            n, torch.float32 if entry.dtype.is_floating_point else None
        )
    block.load_state_dict(state, assign=True, strict=True)
    return block.to(device)


def _head_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return []
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    # A head tied to the embeddings shares their tensor: that one is needed.
    return [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if any(p is q for q in head.parameters()) and id(p) not in tied
    ]


@torch.no_grad()
def _first_inputs(
    plain: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    sequences: torch.Tensor,
    device,
    trust_remote_code: bool = False,
) -> list[tuple[torch.Tensor, dict]]:
    """Per calibration batch: the states entering layer 0 (on the CPU) and the layer's keyword
    arguments, from a one-layer copy of the model of which only what precedes the layers is read
    (the layer and the head stay on the meta device: the forward stops at the layer)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(plain.config)
    cfg.num_hidden_layers = 1
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    shell.eval()
    state = shell.state_dict()
    skip = (decoder_block_names(shell)[0] + ".", *_head_names(shell))
    wanted = [n for n in state if not n.startswith(skip) and n in checkpoint]
    tensors = {n: checkpoint.read(n, state[n].dtype).to(device) for n in wanted}
    shell.load_state_dict(tensors, strict=False, assign=True)
    rebuild_rotary(shell, device)
    out = []
    for i in range(0, sequences.shape[0], CALIB_BATCH):
        x, kwargs = first_layer_inputs(shell, sequences[i : i + CALIB_BATCH].to(device))
        out.append((x.cpu(), kwargs))
    return out


@torch.no_grad()
def _init_layer(
    plain: nn.Module,
    block_name: str,
    checkpoint: SafetensorsCheckpoint,
    states: list[tuple[torch.Tensor, dict]] | None,
    modules: list[str],
    by_module: dict,
    index_of: dict[str, int],
    config: LittleBitConfig,
    act_power: float,
    latent_rms: float | None,
    device: torch.device,
) -> tuple[nn.Module, list[tuple[torch.Tensor, dict]] | None]:
    """Rank 0: layer ``block_name`` of the student, and the calibration states after the teacher's layer."""
    block = _teacher_layer(plain, block_name, checkpoint, device)
    scales = None
    if states is not None:
        moved, tokens = [], 0
        with InputSquares({n: plain.get_submodule(n) for n in modules}) as squares:
            for x, kwargs in states:
                y = layer_output(block(x.to(device), **kwargs))
                tokens += x.shape[0] * x.shape[1]
                moved.append((y.cpu(), kwargs))
        states = moved
        scales = scale_function(squares.rms(tokens), act_power)
    for name in modules:
        scale = scales(name) if scales is not None else None
        convert_module(plain, name, by_module[name], config, index_of[name], device, scale)
    if latent_rms is not None:
        rescale_latents(block, latent_rms)
    return block, states


def _agree(failure: str, device: torch.device) -> None:
    """Rank 0's outcome for a layer, on every rank: a failure there raises everywhere at once (the
    other ranks would otherwise wait in the next broadcast until the process group timed out)."""
    flag = torch.tensor([1 if failure else 0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(flag, src=0)
    if flag.item():
        raise LittleBitError(f"initialising the student failed on rank 0: {failure or 'see its log'}")


@torch.no_grad()
def _scatter(target: nn.Module, source: nn.Module | None, device: torch.device) -> None:
    """Every parameter of ``source`` (rank 0's whole layer) into the shards of ``target``."""
    held = dict(source.named_parameters()) if source is not None else {}
    for name, p in target.named_parameters():
        if source is not None:
            full = held[name].detach().to(device=device, dtype=p.dtype).contiguous()
        else:
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(full, src=0)
        local = local_shard(p)
        local.copy_(_checked(local, full[local_index(p)], name))


def init_student_streamed(
    student: nn.Module,
    source: str | Path,
    config: LittleBitConfig,
    calibration: torch.Tensor | None,
    act_power: float,
    latent_rms: float | None,
    device: torch.device,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> None:
    """Fill the sharded, materialised ``student`` with ``make_student``'s initialisation of the
    teacher in ``source``; every rank calls it, rank 0 does the fitting (see the module docstring)."""
    checkpoint = SafetensorsCheckpoint(source)
    # By identity: fully_shard renames the layers' classes, which name-based lookups go by.
    layer_ids = {id(m) for m in decoder_layers(student)}
    blocks = [name for name, m in student.named_modules() if id(m) in layer_ids]
    missing = fill_from_checkpoint(student, checkpoint, skip=tuple(b + "." for b in blocks))
    if missing:
        raise LittleBitError(f"{source} lacks {len(missing)} tensor(s) the student needs, e.g. {missing[0]}")
    main = not dist.is_initialized() or dist.get_rank() == 0
    plain = states = by_module = index_of = None
    if main:
        plain = meta_skeleton(Path(source), trust_remote_code)
        targets, _ = checked_plan(plain, config)
        by_module = targets_by_module(targets)
        index_of = {name: i for i, name in enumerate(by_module)}
        if calibration is not None and calibration.numel() and act_power != 0:
            states = _first_inputs(plain, checkpoint, calibration, device, trust_remote_code)
    done: set[str] = set()
    for block_name in tqdm(blocks, desc="LittleBit init", disable=not (main and progress)):
        layer, failure = None, ""
        if main:
            modules = [m for m in by_module if m.startswith(block_name + ".")]
            args = (config, act_power, latent_rms, device)
            try:
                layer, states = _init_layer(
                    plain, block_name, checkpoint, states, modules, by_module, index_of, *args
                )
                done.update(modules)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not wait in a broadcast
                failure = f"{block_name}: {e}"
        _agree(failure, device)
        _scatter(student.get_submodule(block_name), layer, device)
        if layer is not None:
            layer.to("meta")  # frees it: rank 0 holds one layer at a time
    if main and done != set(by_module):
        left = sorted(set(by_module) - done)
        raise LittleBitError(f"{len(left)} layer(s) were not initialised, e.g. {left[0]}")
