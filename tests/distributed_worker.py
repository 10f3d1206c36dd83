"""One process of a sharded training run on a tiny random Llama, as ``torchrun`` would start it.

``python distributed_worker.py WORK OUT [--resume] [--kill-at N]``, with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Rank 0 writes the final student's weights
to OUT (safetensors). ``--kill-at N``: every rank SIGKILLs itself right after the optimizer step of
global step N, before that step is logged or saved.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from littlebit.config import LittleBitConfig  # noqa: E402
from littlebit.training import log as train_log  # noqa: E402
from littlebit.training.config import BlockConfig, LearningRates, TrainConfig  # noqa: E402
from littlebit.training.distributed import Distributed  # noqa: E402
from littlebit.training.trainer import Trainer, train  # noqa: E402

LB = LittleBitConfig(bpw=4.0, init="itq")


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))


def config() -> TrainConfig:
    # Global batch 4 (2 per rank over 2 ranks) in 2 micro-steps, with clipping and relative rates.
    return TrainConfig(
        steps=6,
        seqlen=16,
        batch_size=4,
        grad_accum=2,
        blocks=BlockConfig(sequences=0),
        calib_sequences=4,
        save_every=2,
        keep_checkpoints=0,
        lrs=LearningRates(scale=0.05, norm=0.05),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The curves are not what is tested here, and drawing them costs seconds per run.
    train_log.write_curves = lambda path: None
    if args.kill_at:
        step = Trainer._train_step

        def killing_step(self, *a):
            parts = step(self, *a)
            if self.step + 1 == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return parts

        Trainer._train_step = killing_step
    d = Distributed(timeout_s=60)
    try:
        res = train(
            tiny_model("llama", seed=0), tokens(), LB, config(), args.work, progress=False,
            resume=args.resume, distributed=d,
        )  # fmt: skip
        student = d.gather_student(res.student)
        if d.is_main:
            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, args.out)
    finally:
        d.close()


if __name__ == "__main__":
    main()
