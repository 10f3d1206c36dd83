"""One process of a sharded run whose teacher and student are built on the meta device and filled
from a safetensors directory (``Distributed(source=...)``), as ``torchrun`` would start it.

``python sharded_init_worker.py MODEL WORK OUT init|train [--act-power P] [--whole] [--resume-from DIR]``:
``init`` sets the run up and rank 0 writes the gathered student and teacher to OUT (safetensors,
``student.``/``teacher.`` prefixes) and every rank its share of each model's parameters to
``OUT.rankR.json``; ``train`` trains as ``distributed_worker`` does and rank 0 writes
the final student. ``--whole`` loads the teacher whole on every rank instead (the path for sources
other than safetensors), for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import LB, config, tokens  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from littlebit.hf.models import load_model  # noqa: E402
from littlebit.training import log as train_log  # noqa: E402
from littlebit.training.distributed import Distributed  # noqa: E402
from littlebit.training.trainer import Trainer, train  # noqa: E402

# Two calibration batches of the initialisation (8 sequences each), the second short.
CALIB_SEQUENCES = 11


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("work")
    parser.add_argument("out")
    parser.add_argument("mode", choices=["init", "train"])
    parser.add_argument("--act-power", type=float, default=1.0)
    parser.add_argument("--whole", action="store_true")
    parser.add_argument("--resume-from", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_log.write_curves = lambda path: None
    d = Distributed(timeout_s=60, source=None if args.whole else args.model)
    cfg = config()
    cfg.act_power = args.act_power
    cfg.calib_sequences = CALIB_SEQUENCES
    try:
        teacher = load_model(args.model) if args.whole else d.meta_teacher()
        if args.mode == "init":
            trainer = Trainer(teacher, tokens(), LB, cfg, args.work, progress=False, distributed=d)
            trainer.setup(False)
            share = {
                name: sum(p.to_local().numel() for p in m.parameters())
                / sum(p.numel() for p in m.parameters())
                for name, m in (("student", trainer.student), ("teacher", trainer.teacher))
            }
            Path(f"{args.out}.rank{d.rank}.json").write_text(json.dumps(share))
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = {
                f"student.{k}": v for k, v in get_model_state_dict(trainer.student, options=full).items()
            }
            teacher_state = get_model_state_dict(trainer.teacher, options=full)
            state.update((f"teacher.{k}", v) for k, v in teacher_state.items())
        else:
            res = train(
                teacher,
                tokens(),
                LB,
                cfg,
                args.work,
                progress=False,
                resume_from=args.resume_from,
                distributed=d,
            )
            student = d.gather_student(res.student)
            state = student.state_dict() if d.is_main else {}
            # Gathered again, each decoder layer packed as it arrives (what ``littlebit train`` writes).
            packed = d.gather_student(res.student, pack=True)
            if d.is_main:
                tensors = {k: v.contiguous().clone() for k, v in packed.state_dict().items()}
                save_file(tensors, f"{args.out}.packed.safetensors")
        if d.is_main:
            save_file({k: v.contiguous().clone() for k, v in state.items()}, args.out)
    finally:
        d.close()


if __name__ == "__main__":
    main()
