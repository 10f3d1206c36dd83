"""A step (a training micro-step, a decoding step, an evaluation window) recorded once as a CUDA graph
and replayed.

On the default model a global-distillation step keeps the H100 busy for ~46 ms, but issuing its
~5,200 kernels from Python took ~230 ms (``benchmarks/results/train_profile.json``): the step is
bound by the CPU, not the GPU. Replaying a recorded graph issues all of them at once. The same holds
for a forward over an evaluation window, where each packed layer's call costs hundreds of µs on the
host (BENCHMARKS.md, "where a 2048-token prompt's time goes").

For training, what stays outside the graph: the optimizer step and the zeroing of the gradients (a
few fused launches), so learning-rate schedules, frozen groups and checkpoints work as in eager mode.
The gradients must exist before recording, so that the recorded backward *adds* into them in place
and gradient accumulation keeps working; the trainer zeroes them in place instead of dropping them.

Recording needs every kernel's code to be ready (compiled, autotuned), so the first steps run
eagerly. A model whose forward cannot be recorded (a host sync, a data-dependent shape) makes
recording fail; the step then stays eager, with a warning, rather than stopping the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

MicroStep = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class GraphedMicroStep:
    """``step(batch) -> {name: scalar tensor}``, eager for ``warmup`` calls, then a replayed graph.

    ``fn`` runs on ``batch`` (a forward and backward, a decoding step, a forward and its loss) and
    returns detached tensors. The returned tensors are copies, valid after the next replay. Forward
    hooks of a model ``fn`` runs fire while recording, not on replays.
    """

    def __init__(self, fn: MicroStep, warmup: int = 2, what: str = "training step") -> None:
        self.fn, self.warmup, self.what = fn, warmup, what
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._batch: torch.Tensor | None = None
        self._out: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.graph is None and not self.failed and self.calls > self.warmup:
            self._record(batch)
        if self.graph is None:
            return self.fn(batch)
        if batch.shape != self._batch.shape:
            raise ValueError(f"a recorded step takes batches of shape {tuple(self._batch.shape)}")
        self._batch.copy_(batch, non_blocking=True)
        self.graph.replay()
        return {k: v.clone() for k, v in self._out.items()}

    def _record(self, batch: torch.Tensor) -> None:
        self._batch = batch.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(batch.device), torch.cuda.graph(graph):
                self._out = self.fn(self._batch)
        except Exception as err:  # recording is an optimisation: the eager step still works
            self.failed = True
            self._out, self._batch = {}, None
            torch.cuda.synchronize()
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("%s not recorded as a CUDA graph, staying eager: %s", self.what, reason)
            return
        self.graph = graph
