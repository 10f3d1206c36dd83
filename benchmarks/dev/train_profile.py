"""Where a global-distillation step's time goes (training throughput), on the default model.

Builds a student (Dual-SVID, no activation statistics: the init does not change the step's cost),
runs warm-up steps, times each part of a step with device syncs between them (teacher forward,
student forward, loss, backward, optimizer), then profiles whole steps and prints the kernels that
take the most device time, the number of kernel launches and the share of the wall time the device
was busy. Writes ``benchmarks/results/train_profile.json``.

    python benchmarks/dev/train_profile.py --bpw 1.0 --steps 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (puts src on the path too)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from littlebit.config import LittleBitConfig  # noqa: E402
from littlebit.hf.models import load_model, load_tokenizer  # noqa: E402
from littlebit.training.config import (
    BlockConfig,  # noqa: E402
    TrainConfig,  # noqa: E402
)
from littlebit.training.distill import distill_loss  # noqa: E402
from littlebit.training.stream import Batches, load_tokens  # noqa: E402
from littlebit.training.trainer import Trainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, default=1.0)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 4 warm-up steps)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--compile", choices=("on", "off"), help="default: the trainer's (off with graphs)")
    ap.add_argument("--no-graphs", action="store_true", help="launch every kernel from Python")
    ap.add_argument("--parts", action="store_true", help="also time the parts of eager steps")
    ap.add_argument("--out", default="benchmarks/results/train_profile.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script only
    teacher = load_model(None, device=device)
    tok = load_tokenizer(None)
    cfg = TrainConfig(
        steps=1000,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        act_power=0.0,
        blocks=BlockConfig(sequences=0),
        save_every=0,
        compile=None if args.compile is None else args.compile == "on",
        cuda_graphs=not args.no_graphs,
    )
    trainer = Trainer(teacher, load_tokens(None, tok), LittleBitConfig(bpw=args.bpw), cfg, tempfile.mkdtemp(),
                      tok, None, progress=False)  # fmt: skip
    trainer.setup(False)
    trainer.phase = "global"
    trainer._make_optimizer()
    t_model, s_fwd = trainer.prepare_global()
    batches = Batches(trainer.sequences, cfg.batch_size, 0, 0)

    def step(parts: dict | None = None) -> None:
        if parts is None:  # the trainer's own step: recorded as a CUDA graph unless --no-graphs
            trainer._train_step(batches, t_model, s_fwd)
            return
        # Synced, eager parts of one step, to see where the time goes.
        batch = batches.next().to(device)
        t0 = common.clock()
        with torch.no_grad(), trainer.amp():
            t_out = t_model(batch, output_hidden_states=True, use_cache=False)
        t1 = common.clock()
        with trainer.amp():
            s_out = s_fwd(batch, output_hidden_states=True, use_cache=False)
        t2 = common.clock()
        s_hid, t_hid = s_out.hidden_states[1:], t_out.hidden_states[1:]
        loss, _ = distill_loss(s_out.logits, t_out.logits, s_hid, t_hid, cfg.loss)
        t3 = common.clock()
        loss.backward()
        t4 = common.clock()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=not trainer.use_graphs)
        t5 = common.clock()
        for k, v in zip(("teacher", "student_fwd", "loss", "backward", "optimizer"),
                        (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):  # fmt: skip
            parts.setdefault(k, []).append(v * 1e3)

    for _ in range(args.warmup):
        step()
    parts: dict[str, list[float]] = {}
    if args.parts:
        for _ in range(args.steps):
            step(parts)
    walls = []
    for _ in range(args.steps):
        t0 = common.clock()
        step()
        walls.append(common.clock() - t0)
    tokens = cfg.batch_size * cfg.seqlen
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = common.clock()
        for _ in range(3):
            step()
        prof_wall = common.clock() - t0
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or device == "cpu"]
    dev_us = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:25]
    print(f"{'kernel':90s} {'calls/step':>10s} {'ms/step':>8s}")
    for e in top:
        print(f"{e.key[:90]:90s} {e.count / 3:10.1f} {e.self_device_time_total / 3e3:8.2f}")
    wall_ms = statistics.median(walls) * 1e3
    result = {
        "bpw": args.bpw,
        "batch": f"{cfg.batch_size}x{cfg.seqlen}",
        "compile": trainer.use_compile,
        "cuda_graphs": trainer.use_graphs and trainer._micro.active,
        "step_ms_median": round(wall_ms, 2),
        "tokens_per_s": round(tokens / (wall_ms / 1e3), 1),
        "parts_ms_median (synced)": {k: round(statistics.median(v), 2) for k, v in parts.items()},
        "profiled_device_busy_ms_per_step": round(dev_us / 3e3, 2),
        "profiled_wall_ms_per_step": round(prof_wall / 3 * 1e3, 2),
        "kernel_launches_per_step": round(launches / 3),
        "top_kernels": [  # noqa: E501
            {
                "name": e.key[:120],
                "calls_per_step": e.count / 3,
                "ms_per_step": round(e.self_device_time_total / 3e3, 3),
            }
            for e in top
        ],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/dev/train_profile.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(records + [result], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
