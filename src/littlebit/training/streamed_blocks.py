"""Block reconstruction while streaming: each decoder layer is fitted to the teacher's as it is compressed.

The block stage of training (``blockwise``) holds the whole teacher and student on the device. Here
only one decoder layer is there at a time: the teacher's and the student's hidden states for the
calibration sequences stay in CPU memory between layers, and after each written layer they are saved
next to the shards, so an interrupted run resumes after the last finished layer. For each layer:
the teacher layer (source weights) maps the teacher's states to its outputs; the layer is converted;
the student layer is fitted (``blockwise.fit_layer``) to map the student's states (or the teacher's,
``inputs="teacher"``) to those outputs; the student's states move on through the fitted layer.

A model far larger than the GPU is so reconstructed on one GPU: device memory holds one layer, its
training state, and the calibration states of that layer (two ``sequences x seqlen x hidden``
float32 tensors).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from littlebit.hf.shards import SafetensorsCheckpoint
from littlebit.hf.streaming import LayerHooks, PartialUnusable
from littlebit.training.blockwise import first_layer_inputs, fit_layer, layer_output
from littlebit.training.config import BlockConfig, LearningRates

STATES_NAME = "block-states.safetensors"


def _states_digest(layer: int, teacher: torch.Tensor, student: torch.Tensor) -> str:
    """The saved states' digest, kept in the file itself: it is replaced after every layer, and a
    digest written apart from it could be left describing the previous one by a crash between the two."""
    h = hashlib.blake2b(str(layer).encode(), digest_size=16)
    for t in (teacher, student):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


class StreamedBlockReconstruction(LayerHooks):
    """``LayerHooks`` that fit every converted layer to the teacher's on ``sequences`` (n x seqlen ids)."""

    def __init__(
        self,
        sequences: torch.Tensor,
        config: BlockConfig | None = None,
        lrs: LearningRates | None = None,
        device: torch.device | str | None = None,
        train_norms: bool = True,
        amp: bool | None = None,
    ) -> None:
        self.sequences = sequences.to(torch.int64)
        self.config = config or BlockConfig()
        self.lrs = lrs or LearningRates()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_norms = train_norms
        use_amp = self.device.type == "cuda" if amp is None else amp
        self.amp = _autocast(self.device) if use_amp else contextlib.nullcontext
        self.use_amp = use_amp
        self.losses: list[float] = []
        self.x_t = self.x_s = self.y_t = None
        self.kwargs: dict = {}

    def settings(self) -> dict:
        digest = hashlib.blake2b(self.sequences.numpy().tobytes(), digest_size=12).hexdigest()
        return {
            "block_reconstruction": {
                "sequences": list(self.sequences.shape),
                "tokens_digest": digest,
                "block": asdict(self.config),
                "lrs": asdict(self.lrs),
                "train_norms": self.train_norms,
                "amp": self.use_amp,
            }
        }

    def start(self, model: nn.Module, checkpoint: SafetensorsCheckpoint, work: Path) -> int:
        x0, self.kwargs = self._first_inputs(model, checkpoint)
        states = work / STATES_NAME
        if states.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(states), framework="pt") as f:
                    self.x_t, self.x_s = f.get_tensor("teacher"), f.get_tensor("student")
                    meta = f.metadata()
                intact = meta["digest"] == _states_digest(int(meta["layer"]), self.x_t, self.x_s)
            except Exception:  # unreadable header or tensors, or metadata not ours
                intact = False
            if not intact:
                raise PartialUnusable(
                    f"{STATES_NAME} in {work} was altered or damaged since it was written: "
                    f"remove {work} to start again"
                )
            return int(meta["layer"]) + 1
        self.x_t, self.x_s = x0, x0.clone()
        return 0

    @torch.no_grad()
    def _first_inputs(self, model: nn.Module, checkpoint: SafetensorsCheckpoint) -> tuple[torch.Tensor, dict]:
        """States entering the first layer, from a one-layer copy of the model holding the source's
        embeddings (and whatever else precedes the layers); the layer itself is never run."""
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = 1
        with torch.device(self.device):
            shell = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        state = shell.state_dict()
        layer0 = ".layers.0."
        shell.load_state_dict(
            {n: checkpoint.read(n, state[n].dtype) for n in state if layer0 not in n and n in checkpoint},
            strict=False,
        )
        bs = self.config.batch_size
        xs, kwargs = [], None
        for i in range(0, self.sequences.shape[0], bs):
            x, kw = first_layer_inputs(shell, self.sequences[i : i + bs].to(self.device))
            xs.append(x.float().cpu())
            kwargs = kwargs if kwargs is not None else kw
        del shell
        return torch.cat(xs), kwargs

    @torch.no_grad()
    def _run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer`` over the CPU-held states ``x``, a batch at a time on the device; result on CPU."""
        out = torch.empty_like(x)
        bs = self.config.batch_size
        for i in range(0, x.shape[0], bs):
            with self.amp():
                y = layer_output(layer(x[i : i + bs].to(self.device), **self.kwargs))
            out[i : i + bs] = y.float().cpu()
        return out

    def teacher(self, index: int, block: nn.Module) -> None:
        block.to(self.device)  # conversion then happens there too, and the student stays there
        self.y_t = self._run(block, self.x_t)

    def student(self, index: int, block: nn.Module) -> None:
        cfg = self.config
        steps = (self.x_s.shape[0] + cfg.batch_size - 1) // cfg.batch_size * cfg.epochs
        if steps > 0:
            x = (self.x_t if cfg.inputs == "teacher" else self.x_s).to(self.device)
            y = self.y_t.to(self.device)
            block.train()
            args = (self.kwargs, cfg, self.lrs, self.amp, self.train_norms, index, steps)
            loss = fit_layer(block, x, y, *args, cuda_graphs=False)
            block.eval()
            del x, y
            self.losses.append(loss)
        self.x_s = self._run(block, self.x_s)
        self.x_t, self.y_t = self.y_t, None

    def saved(self, index: int, work: Path) -> None:
        from safetensors.torch import save_file

        path = work / STATES_NAME
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            meta = {"layer": str(index), "digest": _states_digest(index, self.x_t, self.x_s)}
            save_file({"teacher": self.x_t, "student": self.x_s}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def finish(self, work: Path) -> None:
        (work / STATES_NAME).unlink(missing_ok=True)
