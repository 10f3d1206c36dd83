"""What one training checkpoint of the default model costs: its size and the time to write it.

Builds the student ``littlebit train`` makes (1.0 BPW, one path, attention at 1.5x; Dual-SVID, since
the initialisation does not change what is saved), then times ``Trainer.save`` as the block stage
calls it (the trained tensors and the random state) and as the global phase does (with the optimizer's
two moments after one step), ``--repeats`` times each, into a fresh directory on the disk of
``--dir``. Writes ``benchmarks/results/checkpoint_cost_<cpu|gpu>.json``.

    python benchmarks/checkpoint_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import common
import torch

from littlebit.config import LittleBitConfig
from littlebit.hf.models import load_model, load_tokenizer
from littlebit.training.checkpoints import list_checkpoints
from littlebit.training.config import BlockConfig, TrainConfig
from littlebit.training.stream import load_tokens
from littlebit.training.trainer import Trainer


def timed_saves(trainer: Trainer, repeats: int, work: str) -> tuple[list[float], int]:
    """Seconds of each save, and the bytes of the last checkpoint on disk."""
    seconds = []
    for i in range(repeats):
        trainer.next_block, trainer.step = i + 1, i + 1
        t0 = time.perf_counter()
        trainer.save()
        seconds.append(time.perf_counter() - t0)
    newest = list_checkpoints(work)[-1]
    size = newest.stat().st_size + newest.with_suffix(".safetensors").stat().st_size
    return seconds, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    args = ap.parse_args()
    load = [round(x, 2) for x in os.getloadavg()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(None, device=device)
    tok = load_tokenizer(None)
    config = TrainConfig(steps=1, act_power=0.0, blocks=BlockConfig(sequences=0), save_interval_s=0)
    lb = LittleBitConfig(bpw=args.bpw, residual=False, attention_bpw_factor=1.5)
    records = []
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        trainer = Trainer(teacher, load_tokens(None, tok), lb, config, work, tok, None, progress=False)
        trainer.setup(False)
        trainer.phase, trainer.optimizer = "blocks", None
        seconds, size = timed_saves(trainer, args.repeats, work)
        records.append({"phase": "blocks", "bytes": size, "seconds": [round(s, 3) for s in seconds]})
        trainer.phase = "global"
        trainer._make_optimizer()
        for p in trainer.student.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        trainer.optimizer.step()  # the moments exist from the first step on
        seconds, size = timed_saves(trainer, args.repeats, work)
        records.append({"phase": "global", "bytes": size, "seconds": [round(s, 3) for s in seconds]})
    for r in records:
        r["median_s"] = round(statistics.median(r["seconds"]), 3)
        print(f"{r['phase']:7s} {r['bytes'] / 1e9:6.2f} GB  median {r['median_s']:6.2f} s  ({r['seconds']})")
    tag = "gpu" if device == "cuda" else "cpu"
    common.write_results(f"checkpoint_cost_{tag}", records, bpw=args.bpw, load_average_before=load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
