"""Quantization-aware training by distillation: block reconstruction, then global distillation.

Phases, each resumable: ``blocks`` (one decoder layer at a time against the teacher's layer
outputs, see ``blockwise``), then ``global`` (the whole student against the teacher's logits and
hidden states, see ``distill``). A checkpoint holds the trained tensors, the optimizer (its groups
by parameter name), the RNG states and the data position; ``resume=True`` continues from the newest
(``resume_from`` from a given one) and, on CPU, ends with the same weights bit for bit as a run that
was never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from littlebit.config import LittleBitConfig, LittleBitError
from littlebit.runtime.step_graph import GraphedMicroStep
from littlebit.training.blockwise import decoder_layers, reconstruct_blocks
from littlebit.training.checkpoints import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_checkpoints,
    remove_stale,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from littlebit.training.compiled import causal_mask, compile_layers, eager_layers, uncompile_layers
from littlebit.training.config import TrainConfig
from littlebit.training.data import training_sequences
from littlebit.training.distill import distill_loss
from littlebit.training.log import TrainLog
from littlebit.training.optim import (
    lr_factor,
    make_optimizer,
    param_groups,
    select_trainable,
    set_lr,
)
from littlebit.training.stream import Batches
from littlebit.training.student import cast_floating, make_student
from littlebit.training.teacher_text import model_identity

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from littlebit.training.distributed import Distributed

log = logging.getLogger(__name__)

# Steps left out of the throughput figure: the first ones compile and warm the allocator up.
_WARM_STEPS = 3


@dataclass
class TrainResult:
    student: nn.Module
    history: list[dict]  # {"step", "tokens", "ppl"} at each evaluation
    tokens: int  # every token a student pass was trained on, calibration included
    tokens_per_s: float  # global phase after warm-up, student + teacher, without evaluation and checkpoints
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of this process


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext
    # No cast cache: tensors it keeps across a CUDA-graph recording would outlive the recording.
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def trained_state(model: nn.Module, kinds: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Every tensor training may change, whether or not it is being trained right now."""
    ids = {id(p) for params in kinds.values() for p in params}
    return {f"model.{n}": p for n, p in model.named_parameters() if id(p) in ids}


class Trainer:
    """One run: owns the student, the optimizer, the data position and the checkpoints."""

    def __init__(
        self,
        teacher: nn.Module,
        data: torch.Tensor | str | Path | None,
        lb_config: LittleBitConfig,
        config: TrainConfig,
        work_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        eval_ids: torch.Tensor | None = None,
        progress: bool = True,
        distributed: Distributed | None = None,
        data_cache: str | Path | None = None,
    ) -> None:
        self.teacher, self.lb_config, self.config = teacher, lb_config, config
        self.dist = distributed  # a sharded run (see ``distributed``): it owns setup and checkpoints
        self.work_dir, self.tokenizer, self.eval_ids, self.progress = (
            Path(work_dir),
            tokenizer,
            eval_ids,
            progress,
        )
        self.device = distributed.device if distributed is not None else next(teacher.parameters()).device
        cuda = self.device.type == "cuda"
        self.use_amp = cuda if config.amp is None else config.amp
        self.use_graphs = cuda and (config.cuda_graphs is None or config.cuda_graphs)
        # Recorded or not, a step of compiled layers runs fewer, fused kernels (train_profile_b2_h100.json).
        self.use_compile = cuda if config.compile is None else config.compile
        self.amp = _autocast(self.device, self.use_amp)
        self.sequences = training_sequences(data, config, tokenizer, teacher, data_cache, self._on_shard)
        self.history: list[dict] = []
        self.tokens = 0
        self.step = 0
        self.phase = "blocks"
        self.next_block = 0
        self.position = 0
        self.student: nn.Module | None = None
        self.optimizer = None

    # ----- setup -----------------------------------------------------------------------------
    def _on_shard(self, have: int, wanted: int, seconds: float) -> None:
        if self.progress:
            tqdm.write(f"generated text: {have:,} of {wanted:,} tokens (last shard {seconds:.1f} s)")

    def _calibration(self) -> torch.Tensor:
        n = min(self.config.calib_sequences, self.sequences.shape[0])
        return self.sequences[:n]

    def _block_sequences(self) -> torch.Tensor:
        # The calibration slice starts the data; block reconstruction reads the sequences after it.
        start = min(self.config.calib_sequences, self.sequences.shape[0])
        idx = [(start + i) % self.sequences.shape[0] for i in range(self.config.blocks.sequences)]
        return self.sequences[idx]

    def setup(self, resume: bool, resume_from: str | Path | None = None) -> None:
        """Start afresh, or continue from the newest checkpoint (``resume``) or from ``resume_from``."""
        t0 = time.perf_counter()
        self._setup(resume or resume_from is not None, resume_from)
        self.timings = {"setup": time.perf_counter() - t0}

    def _setup(self, resume: bool, resume_from: str | Path | None) -> None:
        if self.dist is not None:
            return self.dist.setup(self, resume, resume_from)
        # which weights the run distils from, so that a resumed run refuses another model's checkpoint
        self._teacher_id = model_identity(self.teacher)
        stale = remove_stale(self.work_dir)
        if stale:
            log.info("removed what an interrupted checkpoint write left: %s", ", ".join(stale))
        state = load_checkpoint(self.work_dir, resume_from) if resume else None
        if resume and state is None:
            log.warning("no checkpoint in %s: starting from the beginning", self.work_dir)
        if state is not None:
            self._check_compatible(state.meta)
        # Checkpoints past the starting point belong to a run that is being abandoned; left in place,
        # they would pass for the newest and be resumed from, or be kept in place of this run's own.
        dropped = remove_checkpoints(self.work_dir, state.path if state is not None else None)
        if dropped:
            log.warning("deleted checkpoints past the starting point: %s", ", ".join(dropped))
        calib = None if state is not None else self._calibration()
        cfg = self.config
        self.student = make_student(
            self.teacher, self.lb_config, calib, cfg.act_power, cfg.latent_rms, self.progress, cfg.grad_power
        )
        self.kinds = select_trainable(self.student, self.config.train_norms)
        if state is None:
            self.tokens = calib.numel() if cfg.uses_calibration else 0
            self.log = TrainLog(self.work_dir, None, self.config.tensorboard)
            return
        tensors, meta, _ = state
        self.phase, self.step, self.next_block = meta["phase"], meta["step"], meta["next_block"]
        self.position, self.tokens, self.history = meta["position"], meta["tokens"], meta["history"]
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("model."):
                    params[key[len("model.") :]].copy_(value)
        if self.phase == "global":
            self._make_optimizer(tensors, meta["optimizer"])
        restore_rng(tensors)
        self.log = TrainLog(self.work_dir, (self.phase, self.step, self.next_block), self.config.tensorboard)

    def _data_fingerprint(self) -> list[int]:
        return [int(self.sequences.shape[0]), int(self.sequences.shape[1]), int(self.sequences.sum())]

    def _check_compatible(self, meta: dict) -> None:
        if meta["littlebit_config"] != self.lb_config.to_dict():
            raise LittleBitError(f"the checkpoint in {self.work_dir} was made with another LittleBit config")
        if "teacher" in meta and meta["teacher"] != self._teacher_id:
            raise LittleBitError(f"the checkpoint in {self.work_dir} was made from another model")
        if meta.get("data") != self._data_fingerprint():
            raise LittleBitError(f"the checkpoint in {self.work_dir} was made on other training data")
        now, then = self.config.to_dict(), meta["train_config"]
        changed = sorted(k for k in set(now) | set(then) if then.get(k) != now.get(k))
        if changed:
            log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))

    def _make_optimizer(
        self, tensors: dict[str, torch.Tensor] | None = None, saved: dict | None = None
    ) -> None:
        """A fresh optimizer, or the one saved in a checkpoint (``tensors``, ``saved``), groups as saved."""
        self.kinds = select_trainable(self.student, self.config.train_norms)
        self.param_names = {id(p): n for n, p in self.student.named_parameters()}
        if saved is None:
            self.optimizer = make_optimizer(param_groups(self.kinds, self.config.lrs))
            return
        kinds = {self.param_names[id(p)]: kind for kind, params in self.kinds.items() for p in params}
        params = dict(self.student.named_parameters())
        self.optimizer = optimizer_from_flat(tensors, saved, params, kinds)

    def save(self) -> None:
        self._last_save = time.monotonic()
        if self.dist is not None:
            return self.dist.save(self)
        tensors = {**trained_state(self.student, self.kinds), **rng_tensors()}
        meta = {
            "phase": self.phase,
            "step": self.step,
            "next_block": self.next_block,
            "position": self.position,
            "tokens": self.tokens,
            "history": self.history,
            "train_config": self.config.to_dict(),
            "littlebit_config": self.lb_config.to_dict(),
            "data": self._data_fingerprint(),
            "teacher": self._teacher_id,
        }
        if self.optimizer is not None:
            opt_tensors, meta["optimizer"] = optimizer_to_flat(self.optimizer, self.param_names)
            tensors.update(opt_tensors)
        tag = f"{self.phase}-{self.next_block if self.phase == 'blocks' else self.step:06d}"
        save_checkpoint(self.work_dir, tag, tensors, meta, self.config.keep_checkpoints)

    def _save_due(self) -> bool:
        """Whether ``save_interval_s`` has passed since the last checkpoint (or the run's start)."""
        interval = self.config.save_interval_s
        return bool(interval) and time.monotonic() - self._last_save >= interval

    # ----- phases ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._last_save = time.monotonic()
        start = time.perf_counter()
        self.global_seconds, self._global_tokens = 0.0, 0
        if self.phase == "blocks":
            self._blocks()
            self.timings["blocks"] = time.perf_counter() - start
        if self.phase == "global":
            t0 = time.perf_counter()
            try:
                self._global()
            finally:
                self._uncompile()
            self.timings["global"] = time.perf_counter() - t0
        self.log.close()
        tps = self._global_tokens / self.global_seconds if self.global_seconds else float("nan")
        seconds = time.perf_counter() - start
        return TrainResult(self.student, self.history, self.tokens, tps, seconds, self.timings)

    def _blocks(self) -> None:
        cfg = self.config.blocks
        if cfg.sequences and cfg.epochs:
            seqs = self._block_sequences()

            total, n_layers = seqs.numel() * cfg.epochs, len(decoder_layers(self.student))

            def done(index: int, loss: float) -> None:
                self.next_block = index + 1
                # Each layer's share of the phase's token cost, summing exactly to the total.
                self.tokens += total * (index + 1) // n_layers - total * index // n_layers
                self.log.write({"phase": "blocks", "block": index, "rel_err": loss, "tokens": self.tokens})
                if self.config.save_every or self._save_due():
                    self.save()

            reconstruct_blocks(
                self.teacher,
                self.student,
                seqs,
                cfg,
                self.config.lrs,
                self.amp,
                self.config.train_norms,
                start_block=self.next_block,
                on_block_done=done,
                progress=self.progress,
                cuda_graphs=self.use_graphs,
                compiled=self.use_compile,
            )
        self.phase = "global"
        self._make_optimizer()
        self._evaluate()
        self.save()

    def _global(self) -> None:
        cfg = self.config
        if self.optimizer is None:
            self._make_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        teacher, student_fwd = self.prepare_global()
        batches = Batches(self.sequences, cfg.batch_size, cfg.seed, self.position)
        if self.dist is not None:
            batches = self.dist.shard_batches(batches)
        warmup = math.ceil(cfg.warmup_frac * cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distillation", disable=not self.progress)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            set_lr(self.optimizer, lr_factor(self.step, cfg.steps, warmup))
            parts = self._train_step(batches, teacher, student_fwd)
            if self.dist is not None:
                # every process must take the same decision to save (a collective): any one's clock
                parts["save_due"] = torch.tensor(float(self._save_due()), device=self.device)
                parts = self.dist.mean(parts)
                due = bool(parts.pop("save_due") > 0)
            else:
                due = self._save_due()
            self.position = batches.position
            self.step += 1
            self.tokens += cfg.tokens_per_step
            record = {"phase": "global", "step": self.step, "tokens": self.tokens}
            names = sorted(parts)
            values = torch.stack([parts[k].float() for k in names]).tolist()  # one sync per step
            record.update(zip(names, values, strict=True))
            dt = time.perf_counter() - t0
            if self.step > _WARM_STEPS or cfg.steps <= _WARM_STEPS:
                self.global_seconds += dt
                self._global_tokens += cfg.tokens_per_step
            record["tokens_per_s"] = cfg.tokens_per_step / dt
            self.log.write(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 or due or self.step == cfg.steps:
                self.save()
        bar.close()

    def prepare_global(self) -> tuple[nn.Module, nn.Module]:
        """The teacher and student as the global phase runs them; sets up the (recorded) micro-step."""
        teacher = self._teacher_for_distillation()
        student_fwd = self._student_forward()
        # compiled layers must not meet a new mask in the recording step (``compiled.causal_mask``)
        recorded_compiled = self.use_compile and self.use_graphs
        self._mask = causal_mask(teacher, self.config.seqlen, self.device) if recorded_compiled else None
        micro = functools.partial(self._micro_step, teacher=teacher, student_fwd=student_fwd)
        self._micro = GraphedMicroStep(micro) if self.use_graphs else micro
        return teacher, student_fwd

    def _micro_step(self, batch: torch.Tensor, teacher: nn.Module, student_fwd) -> dict[str, torch.Tensor]:
        """Forward passes, loss and backward of one micro-batch; the gradients add up in ``.grad``."""
        cfg = self.config
        want_hidden = cfg.loss.weight > 0
        kw = {"output_hidden_states": want_hidden, "use_cache": False}
        if self._mask is not None:
            kw["attention_mask"] = self._mask
        with torch.no_grad(), self.amp():
            t_out = teacher(batch, **kw)
        with self.amp():
            s_out = student_fwd(batch, **kw)
        s_hid = s_out.hidden_states[1:] if want_hidden else ()
        t_hid = t_out.hidden_states[1:] if want_hidden else ()
        reduce = self.dist.reduce_mean if self.dist is not None else None
        loss, parts = distill_loss(s_out.logits, t_out.logits, s_hid, t_hid, cfg.loss, reduce)
        (loss / cfg.grad_accum).backward()
        parts["loss"] = loss.detach()
        return parts

    def _train_step(self, batches: Batches, teacher: nn.Module, student_fwd) -> dict[str, torch.Tensor]:
        cfg = self.config
        totals: dict[str, torch.Tensor] = {}
        for _ in range(cfg.grad_accum):
            parts = self._micro(batches.next().to(self.device))
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v / cfg.grad_accum
        if cfg.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        # A recorded backward adds into the gradients it saw while recording: keep them, zeroed.
        self.optimizer.zero_grad(set_to_none=not self.use_graphs)
        return totals

    def _teacher_for_distillation(self) -> nn.Module:
        teacher = self.teacher
        if self.use_amp and next(teacher.parameters()).dtype == torch.float32:
            # A bf16 copy: half the memory traffic; the caller's fp32 teacher stays as it was.
            teacher = cast_floating(copy.deepcopy(teacher), torch.bfloat16)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        if self.use_compile:
            compile_layers(decoder_layers(teacher))
        return teacher

    def _student_forward(self):
        self.student.train()
        if self.config.grad_checkpoint:
            kw = {"use_reentrant": False}
            enable = getattr(self.student, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if enable is not None:
                enable(activation_checkpointing_kwargs=kw)
            else:
                self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if self.use_compile:
            compile_layers(decoder_layers(self.student))
        return self.student

    def _uncompile(self) -> None:
        """The caller's teacher and the student returned run their plain code again."""
        if self.use_compile:
            uncompile_layers(decoder_layers(self.teacher))
            uncompile_layers(decoder_layers(self.student))

    def _evaluate(self) -> None:
        if self.eval_ids is None:
            return
        from littlebit.evaluation.perplexity import perplexity

        self.student.eval()
        # windows of other shapes, without gradients: compiled layers would compile again, which a
        # window being recorded as a CUDA graph cannot survive
        with self.amp(), eager_layers(decoder_layers(self.student)):
            ppl = perplexity(
                self.student,
                self.eval_ids,
                self.config.eval_seqlen,
                self.config.eval_windows,
                progress=False,
                recorded=self.use_graphs,  # off where training steps are not recorded (sharded runs)
            )
        self.student.train()
        entry = {"step": self.step, "tokens": self.tokens, "ppl": ppl}
        self.history.append(entry)
        self.log.write({"phase": "eval", **entry})
        if self.progress:
            tqdm.write(f"step {self.step}: {self.tokens} tokens, perplexity {ppl:.2f}")


def train(
    teacher: nn.Module,
    data: torch.Tensor | str | Path | None,
    lb_config: LittleBitConfig,
    config: TrainConfig | None = None,
    work_dir: str | Path = "littlebit-train",
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_ids: torch.Tensor | None = None,
    resume: bool = False,
    progress: bool = True,
    resume_from: str | Path | None = None,
    distributed: Distributed | None = None,
    data_cache: str | Path | None = None,
) -> TrainResult:
    """Distil a LittleBit student from ``teacher`` (left unchanged) and return it, trained.

    ``data`` is a 1-D tensor of token ids, or a data spec (``training.data``: a text source,
    ``generated`` or a weighted mixture; None: the default mixture), which needs ``tokenizer``.
    Generated text is cached under ``data_cache`` (default: ``teacher_text.default_cache_dir()``).
    ``eval_ids`` (1, n) enables the periodic perplexity evaluation.
    Checkpoints and the JSONL log go to ``work_dir``; ``resume`` continues from the newest checkpoint
    there, ``resume_from`` from the one named (a ``state-*.json`` or ``.safetensors`` in ``work_dir``).
    ``distributed`` (under ``torchrun``) shards the run over the launched processes.
    """
    trainer = Trainer(
        teacher, data, lb_config, config or TrainConfig(), work_dir, tokenizer, eval_ids, progress,
        distributed=distributed, data_cache=data_cache,
    )  # fmt: skip
    trainer.setup(resume, resume_from)
    return trainer.run()
