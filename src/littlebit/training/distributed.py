"""Training on several processes: student and teacher sharded per decoder layer with FSDP2.

Launched by ``torchrun --nproc-per-node N`` (or ``littlebit train --nproc N``), every process runs
the same ``Trainer``; a ``Distributed`` object handed to it is the trainer's hooks:

- ``setup``: each decoder layer of the student and of the teacher, and the rest of each model, is
  sharded with ``fully_shard`` (bf16 parameters with fp32 gradient reduction when training in bf16,
  the teacher optionally offloaded to the CPU). With a ``source`` (a safetensors directory) both
  models are built on the meta device and no process holds either whole: after sharding each rank
  reads its own slices of the teacher's tensors, and rank 0 initialises the student a decoder layer
  at a time, broadcasting each layer for every rank to keep its shards (``sharded_init``). Without
  one (a GGUF file, an in-memory model) every rank holds the teacher whole, and the student is
  initialised whole on rank 0 and broadcast before sharding. A resumed run loads its sharded
  checkpoint (``sharded_checkpoints``); with a source only the teacher's and the student's frozen
  tensors are read from it.
- ``shard_batches``: ``batch_size`` stays the *global* number of sequences per micro-step. Every
  rank draws the batch the single-process run would draw at the same position of the same seeded
  order and takes its contiguous 1/N share, so the position, the data order and a checkpoint mean
  the same as in a single-process run.
- ``reduce_mean``: the loss is a mean over the global batch. The per-token KL and the paper's MSE
  are means over equal shares, so the mean over ranks is the global value; the normalised hidden
  error divides by the teacher's squared norm over the batch, which is summed across ranks first.
  FSDP averages the gradients over ranks, so the gradient is the single-process one.
- ``mean``: the logged loss terms, averaged over ranks.
- ``save``: ``torch.distributed.checkpoint`` of the trained tensors and the optimizer, every rank
  its shards; ``gather_student``: the final model, whole, on rank 0 only (packed a decoder layer at
  a time as it is gathered, for ``littlebit train``), which writes it once.

The block-reconstruction stage runs on one process only (it trains one layer at a time against
the whole teacher's layer outputs); a sharded run starts with the global phase.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.core.convert import SplitLinear, attach_config, plan, set_submodule
from littlebit.core.layer import LittleBitLinear
from littlebit.hf.shards import SafetensorsCheckpoint
from littlebit.hf.streaming import check_fits, meta_skeleton
from littlebit.runtime.packed import pack_model
from littlebit.training.blockwise import decoder_layers
from littlebit.training.checkpoints import list_checkpoints, optimizer_to_flat
from littlebit.training.config import TrainConfig
from littlebit.training.log import TrainLog
from littlebit.training.optim import select_trainable
from littlebit.training.sharded_checkpoints import (
    finish_sharded,
    load_sharded_meta,
    partial_path,
    position_meta,
    remove_partial,
    remove_sharded,
)
from littlebit.training.sharded_init import (
    fill_from_checkpoint,
    init_student_streamed,
    local_shard,
    rebuild_rotary,
)
from littlebit.training.student import cast_floating, make_student

if TYPE_CHECKING:
    from littlebit.training.stream import Batches

log = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` as ``torchrun`` sets them, or None outside ``torchrun``."""
    if not all(k in os.environ for k in _TORCHRUN_ENV):
        return None
    try:
        rank, world, local = (int(os.environ[k]) for k in _TORCHRUN_ENV[:3])
    except ValueError:
        raise LittleBitError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise LittleBitError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def check_config(config: TrainConfig, world_size: int) -> None:
    """Refuse, in one line, what a sharded run cannot do; called before any model is loaded."""
    if config.blocks.sequences and config.blocks.epochs:
        raise LittleBitError(
            "block reconstruction runs in a single process, not under torchrun: pass --block-sequences 0 "
            "to train on several"
        )
    if config.batch_size % world_size:
        n = config.batch_size
        raise LittleBitError(
            f"the batch size ({n} sequences) must be a multiple of the {world_size} processes"
        )


def student_skeleton(teacher: nn.Module, config: LittleBitConfig) -> nn.Module:
    """The student's structure with uninitialised LittleBit layers: what ranks other than 0 hold
    before the broadcast, and every rank before a checkpoint is loaded (no SVD is run)."""
    student = cast_floating(copy.deepcopy(teacher), torch.float32)
    by_module: dict[str, list] = {}
    for t in plan(student, config):
        by_module.setdefault(t.module_name, []).append(t)
    for name, parts in by_module.items():
        linear = student.get_submodule(name)
        kw = dict(residual=config.residual, sign_function=config.sign_function, device=linear.weight.device)
        new = {
            t.part: LittleBitLinear(
                t.d_in, t.d_out, t.rank, linear.bias is not None, smooth_alpha=config.smooth_alpha, **kw
            )
            for t in parts
        }
        set_submodule(student, name, new[None] if None in new else SplitLinear(new, linear.in_features))
    attach_config(student, config)
    return student


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy whose parameters are on the meta device (no memory) and whose buffers are real: the
    unsharded module that rank 0 fills with the final weights."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def _largest_dim(param: nn.Parameter) -> Shard | None:
    # A latent factor is (paths, d, r) with 1 or 2 paths: sharding dim 0 (the default) would leave
    # most ranks empty. Its largest dimension spreads it evenly.
    if param.dim() == 0:
        return None
    return Shard(max(range(param.dim()), key=lambda d: param.shape[d]))


def _gathered(named) -> dict[str, torch.Tensor]:
    """``{name: the whole tensor on the CPU}``; every rank takes part in the same order (a tensor
    shared under several names, such as a tied head, is gathered once)."""
    out, seen = {}, {}
    for name, p in named:
        if id(p) not in seen:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            seen[id(p)] = whole.detach().cpu()
        out[name] = seen[id(p)]
    return out


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` in place of ``module``'s parameters of those names (buffers stay as they are)."""
    unexpected = module.load_state_dict(tensors, assign=True, strict=False).unexpected_keys
    if unexpected:
        raise LittleBitError(
            f"gathering the student: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}"
        )


def _reshard(module: nn.Module, args, output) -> None:
    module.reshard()


class _NoLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the one log)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RankBatches:
    """This rank's contiguous share of each global batch of ``batches``."""

    def __init__(self, batches: Batches, rank: int, world_size: int) -> None:
        if batches.batch_size % world_size:
            raise LittleBitError(
                f"batch size {batches.batch_size} is not a multiple of {world_size} processes"
            )
        self.batches, self.rank, self.world_size = batches, rank, world_size

    @property
    def position(self) -> int:
        return self.batches.position

    def next(self) -> torch.Tensor:
        full = self.batches.next()
        n = full.shape[0] // self.world_size
        return full[self.rank * n : (self.rank + 1) * n]


class Distributed:
    """The process group of a ``torchrun`` launch, and the trainer's hooks for a sharded run."""

    def __init__(
        self,
        offload_teacher: bool = False,
        timeout_s: float = 1800.0,
        source: str | Path | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        env = launch_env()
        if env is None:
            raise LittleBitError("not launched by torchrun: " + ", ".join(_TORCHRUN_ENV) + " must be set")
        self.rank, self.world_size, self.local_rank = env
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        # On the CPU the shards already live in CPU memory: there is nothing to offload.
        self.offload_teacher = offload_teacher and cuda
        self._plain: nn.Module | None = None
        # A safetensors directory: the teacher is built on the meta device (``meta_teacher``) and
        # both models are filled shard by shard from it (``sharded_init``).
        self.source = Path(source) if source is not None else None
        self.trust_remote_code = trust_remote_code
        self._fresh = True

    def meta_teacher(self) -> nn.Module:
        """The teacher of ``source`` on the meta device, for ``setup`` to shard and fill."""
        if self.source is None:
            raise LittleBitError("no safetensors source to build the teacher from")
        teacher = meta_skeleton(self.source, self.trust_remote_code)
        check_fits(teacher, SafetensorsCheckpoint(self.source), self.source)
        return teacher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----- setup -----------------------------------------------------------------------------
    def setup(self, trainer, resume: bool, resume_from: str | Path | None) -> None:
        """``Trainer.setup`` of a sharded run: build, initialise once, shard, and resume if asked."""
        cfg = trainer.config
        check_config(cfg, self.world_size)
        # Collectives cannot be replayed inside a recorded CUDA graph, and compiling FSDP's hooks is
        # not what this path was tested with: both stay off unless asked for.
        trainer.use_graphs = False
        trainer.use_compile = bool(cfg.compile)
        trainer.progress = trainer.progress and self.is_main
        work = trainer.work_dir
        if self.is_main:
            work.mkdir(parents=True, exist_ok=True)
            stale = remove_partial(work)
            if stale:
                log.info("removed what an interrupted checkpoint write left: %s", ", ".join(stale))
        self.barrier()
        found = load_sharded_meta(work, resume_from) if resume else None
        if resume and found is None and list_checkpoints(work):
            raise LittleBitError(
                f"the checkpoints in {work} are from a single-process run: resume without torchrun"
            )
        if resume and found is None and self.is_main:
            log.warning("no checkpoint in %s: starting from the beginning", work)
        if found is not None:
            trainer._check_compatible(found[0])
        self.barrier()  # every rank has read the checkpoint's JSON before rank 0 deletes any
        if self.is_main:
            dropped = remove_sharded(work, found[1] if found is not None else None)
            if dropped:
                log.warning("deleted checkpoints past the starting point: %s", ", ".join(dropped))
        self._fresh = found is None
        trainer.student = self._build_student(trainer, fresh=found is None)
        if trainer.use_amp and next(trainer.teacher.parameters()).dtype == torch.float32:
            # Cast in place, after the student was copied from the fp32 weights: a sharded teacher
            # is the caller's module anyway (fully_shard changes it in place).
            cast_floating(trainer.teacher, torch.bfloat16)
        self.shard(trainer.student, trainer.teacher, trainer.use_amp)
        self.materialize(trainer)
        trainer.kinds = select_trainable(trainer.student, cfg.train_norms)
        if found is None:
            calib = trainer._calibration()
            trainer.tokens = calib.numel() if cfg.uses_calibration else 0
            trainer.log = TrainLog(work, None, cfg.tensorboard) if self.is_main else _NoLog()
            return
        meta, path = found
        trainer.phase, trainer.step, trainer.next_block = meta["phase"], meta["step"], meta["next_block"]
        trainer.position, trainer.tokens, trainer.history = meta["position"], meta["tokens"], meta["history"]
        if trainer.phase == "global":
            trainer._make_optimizer({}, meta["optimizer"])  # the groups as saved; the state comes next
        self._load(trainer, path, bool(meta.get("optimizer_state")))
        resume_at = (trainer.phase, trainer.step, trainer.next_block)
        trainer.log = TrainLog(work, resume_at, cfg.tensorboard) if self.is_main else _NoLog()

    def _build_student(self, trainer, fresh: bool) -> nn.Module:
        """The unsharded student, the same on every rank (on the meta device with a ``source``: it is
        filled after sharding, ``materialize``).

        The initialisation (calibration statistics, then a Dual-SVID or Joint-ITQ fit per layer) is
        computed once, on rank 0, and broadcast: it is a small part of a run, and one computation
        guarantees that every rank starts from the same bits, where SVDs run on several devices may
        differ in their last bits or in a singular vector's sign. Each rank fitting its own layers
        would be faster on a very large model but needs the same broadcast afterwards.
        """
        cfg = trainer.config
        if self.source is not None:  # filled after sharding (``materialize``)
            if cfg.grad_power:
                raise LittleBitError("grad-power needs a backward pass through the whole, loaded teacher")
            student = student_skeleton(trainer.teacher, trainer.lb_config)
            if self.is_main:
                self._plain = _meta_copy(student)
            return student
        if fresh and self.is_main:
            calib = trainer._calibration()
            student = make_student(
                trainer.teacher, trainer.lb_config, calib, cfg.act_power, cfg.latent_rms, trainer.progress,
                cfg.grad_power,
            )  # fmt: skip
        else:
            student = student_skeleton(trainer.teacher, trainer.lb_config)
        if fresh and self.world_size > 1:
            with torch.no_grad():
                for p in student.parameters():
                    dist.broadcast(p.data, src=0)
        if self.is_main:
            self._plain = _meta_copy(student)
        return student

    def shard(self, student: nn.Module, teacher: nn.Module, bf16: bool) -> None:
        """``fully_shard`` each decoder layer, then the rest of each model, over all ranks."""
        # bf16 parameters for the forward and backward (half the all-gather traffic), gradients
        # reduced and the optimizer's master weights kept in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        teacher_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else None
        offload = CPUOffloadPolicy() if self.offload_teacher else OffloadPolicy()
        for model, policy, off in ((student, mp, OffloadPolicy()), (teacher, teacher_mp, offload)):
            kw = dict(mesh=self.mesh, shard_placement_fn=_largest_dim, offload_policy=off)
            if policy is not None:
                kw["mp_policy"] = policy
            for layer in decoder_layers(model):
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
        # FSDP keeps a root module's parameters gathered after its forward for the backward that
        # follows; the teacher has none, so its embeddings and head would stay whole on every rank.
        teacher.register_forward_hook(_reshard)

    def materialize(self, trainer) -> None:
        """After sharding: where models were built on the meta device (a ``source`` was given),
        allocate each rank's shards and fill them from the checkpoint: the teacher's, then the
        student's initialisation, or for a resumed run only what its checkpoint does not hold.
        Without a source the modules are real already; ``benchmarks/fsdp_step.py`` overrides this."""
        if self.source is None:
            return
        if self.is_main:
            log.info("reading each rank's shards of both models from %s", self.source)
        checkpoint = SafetensorsCheckpoint(self.source)
        # FSDP's CPU offload wants the offloaded shards materialised on the CPU.
        trainer.teacher.to_empty(device="cpu" if self.offload_teacher else self.device)
        missing = fill_from_checkpoint(trainer.teacher, checkpoint)
        if missing:
            raise LittleBitError(f"{self.source} lacks {len(missing)} teacher tensor(s), e.g. {missing[0]}")
        if self.offload_teacher:  # offloaded parameters stay on the CPU; buffers go where it computes
            for module in trainer.teacher.modules():
                for name, b in module.named_buffers(recurse=False):
                    setattr(module, name, b.to(self.device))
        trainer.student.to_empty(device=self.device)
        for model in (trainer.teacher, trainer.student):
            rebuild_rotary(model, self.device)
        cfg = trainer.config
        if self._fresh:
            init_student_streamed(
                trainer.student, self.source, trainer.lb_config, trainer._calibration(), cfg.act_power,
                cfg.latent_rms, self.device, self.trust_remote_code, trainer.progress,
            )  # fmt: skip
            return
        # Resuming: the checkpoint loaded next holds every LittleBit tensor; the rest is the teacher's.
        # Zeroed first so that nothing of to_empty's uninitialised memory can reach the run, even a
        # tensor a checkpoint of another layout would not cover (the load then fails on it cleanly).
        with torch.no_grad():
            for p in trainer.student.parameters():
                local_shard(p).zero_()
        fill_from_checkpoint(trainer.student, checkpoint)

    # ----- hooks of the training step ------------------------------------------------------------
    def shard_batches(self, batches: Batches) -> RankBatches:
        return RankBatches(batches, self.rank, self.world_size)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over ranks (a new tensor; not part of the autograd graph)."""
        out = t.detach().clone()
        dist.all_reduce(out)  # SUM: gloo has no AVG
        return out / self.world_size

    def mean(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logged scalars averaged over ranks, in one collective."""
        names = sorted(parts)
        values = self.reduce_mean(torch.stack([parts[k].float() for k in names]))
        return dict(zip(names, values.unbind(), strict=True))

    # ----- checkpoints -------------------------------------------------------------------------
    def _state(self, trainer, optimizer: bool) -> dict[str, Any]:
        # Only the trained tensors: the rest of the student is the teacher's, rebuilt on resume.
        only_trained = StateDictOptions(ignore_frozen_params=True)
        state: dict[str, Any] = {"model": get_model_state_dict(trainer.student, options=only_trained)}
        if optimizer:
            state["optim"] = get_optimizer_state_dict(
                trainer.student, trainer.optimizer, options=only_trained
            )
        rng = {f"cpu.{self.rank}": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng[f"cuda.{self.rank}"] = torch.cuda.get_rng_state(self.device)
        state["rng"] = rng
        return state

    def save(self, trainer) -> None:
        """Checkpoint the run: every rank writes its shards, rank 0 the JSON; atomic as a whole."""
        tag = f"{trainer.phase}-{trainer.next_block if trainer.phase == 'blocks' else trainer.step:06d}"
        tmp = partial_path(trainer.work_dir, tag)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        # An optimizer that has not stepped yet has no state, and asking for its state dict would
        # create it by taking a step (with rate 0, but counted): the next real step would then be
        # Adam's second, with another bias correction than in a run that never saved.
        stepped = trainer.optimizer is not None and bool(trainer.optimizer.state)
        dcp.save(self._state(trainer, stepped), checkpoint_id=str(tmp))
        self.barrier()  # every rank's files are written
        if self.is_main:
            meta = position_meta(trainer)
            meta["world_size"] = self.world_size
            meta["optimizer_state"] = stepped
            if trainer.optimizer is not None:
                _, meta["optimizer"] = optimizer_to_flat(trainer.optimizer, trainer.param_names)
            finish_sharded(trainer.work_dir, tag, meta, trainer.config.keep_checkpoints)
        self.barrier()

    def _load(self, trainer, path: Path, optimizer: bool) -> None:
        state = self._state(trainer, optimizer)
        dcp.load(state, checkpoint_id=str(path))
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(trainer.student, state["model"], options=opts)
        if optimizer:
            set_optimizer_state_dict(trainer.student, trainer.optimizer, state["optim"], options=opts)
        torch.set_rng_state(state["rng"][f"cpu.{self.rank}"])
        if f"cuda.{self.rank}" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"][f"cuda.{self.rank}"], self.device)

    def remove_checkpoints(self, work_dir: str | Path) -> None:
        """Rank 0 deletes the sharded checkpoints (the model is written)."""
        self.barrier()
        if self.is_main:
            remove_sharded(work_dir)

    # ----- the result ----------------------------------------------------------------------------
    def gather_student(
        self, student: nn.Module, pack: bool = False, scale_dtype: torch.dtype = torch.float16
    ) -> nn.Module | None:
        """The trained student, whole and unsharded, on rank 0's CPU (None on the other ranks),
        gathered a decoder layer at a time.

        ``pack``: each decoder layer is packed (``pack_model``) as soon as it is gathered, so rank 0
        holds one layer's fp32 latents at a time besides the packed layers, not the whole trained
        student (about 150 GB for a 70B model at 0.55 BPW).
        """
        plain = self._plain if self.is_main else None
        targets = decoder_layers(plain) if plain is not None else None
        in_layers: set[int] = set()
        for i, layer in enumerate(decoder_layers(student)):
            gathered = _gathered(layer.named_parameters(remove_duplicate=False))
            in_layers.update(id(p) for p in layer.parameters())
            if plain is not None:
                _assign(targets[i], gathered)
                if pack:
                    pack_model(targets[i], scale_dtype)
        rest = [(n, p) for n, p in student.named_parameters(remove_duplicate=False) if id(p) not in in_layers]
        gathered = _gathered(rest)
        if plain is None:
            return None
        _assign(plain, gathered)
        left = [n for n, p in plain.named_parameters() if p.is_meta]
        if left:
            raise LittleBitError(f"gathering the student left {len(left)} tensor(s) out, e.g. {left[0]}")
        if any(b.is_meta for b in plain.buffers()):  # built on the meta device: see ``materialize``
            rebuild_rotary(plain, "cpu")
        return plain.to("cpu")
