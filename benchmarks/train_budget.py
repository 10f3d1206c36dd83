"""Wall time of a small-budget ``littlebit train`` run, start to finish, on this machine.

Runs the command as a user would (model loading, text generation into a fresh cache, initialisation,
block stage, global distillation, evaluations, saving), and appends one record to the JSON file:
the wall time, the plan the command printed, its JSON summary, and the machine's load average
before and after (the CPU may be shared with other work; the record says how busy it was).

    python benchmarks/train_budget.py --tokens 30000 --out benchmarks/results/train_budget.json

``--observe DIR START`` instead records how far a run still in progress has got (a run too slow to
wait for): DIR is its temporary folder (``littlebit-budget-*``), START its start time in seconds
since the epoch; the record says ``completed: false`` and gives the progress with its timestamps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def progress(folder: Path, start: float) -> dict:
    """What a run in ``folder`` has done so far, each step with its seconds since ``start``."""
    out: dict = {"seconds_so_far": round(time.time() - start, 1)}
    shards = sorted(folder.glob("generated/*/shard-*.safetensors"))
    out["generated_shards"] = [
        {"shard": p.name, "done_at_s": round(p.stat().st_mtime - start, 1)} for p in shards
    ]
    work = folder / "model-train"
    if work.is_dir():
        # The run's folder last changed when the work dir appeared in it: generation and
        # initialisation were over by then.
        out["work_dir_created_at_s"] = round(folder.stat().st_mtime - start, 1)
        out["checkpoints"] = [
            {"checkpoint": p.stem, "written_at_s": round(p.stat().st_mtime - start, 1)}
            for p in sorted(work.glob("state-*.json"))
        ]
    log = work / "train_log.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        out["blocks_done"] = sum(r.get("phase") == "blocks" for r in records)
        out["global_steps_done"] = sum(r.get("phase") == "global" for r in records)
        out["last_record"] = records[-1] if records else None
        out["log_modified_at_s"] = round(log.stat().st_mtime - start, 1)
    return out


def observe(folder: Path, start: float, args: argparse.Namespace) -> dict:
    return {
        "command": f"littlebit train --bpw {args.bpw} --tokens {args.tokens} --device {args.device}",
        "note": "in progress when recorded",
        "tokens": args.tokens,
        "completed": False,
        "progress": progress(folder, start),
        "cpu_count": os.cpu_count(),
        "load_average_now": [round(x, 2) for x in os.getloadavg()],
        "processor": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def append(out: Path, record: dict) -> None:
    records = json.loads(out.read_text()) if out.is_file() else []
    records.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    print(json.dumps(record, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=30_000)
    ap.add_argument("--bpw", default="1.0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more littlebit train arguments")
    ap.add_argument("--out", default="benchmarks/results/train_budget.json")
    ap.add_argument("--observe", nargs=2, metavar=("DIR", "START"), help="record a run in progress")
    args = ap.parse_args()
    if args.observe:
        append(Path(args.out), observe(Path(args.observe[0]), float(args.observe[1]), args))
        return 0
    with tempfile.TemporaryDirectory(prefix="littlebit-budget-") as tmp:
        command = [
            sys.executable,
            "-m",
            "littlebit.cli",
            "train",
            "--bpw",
            args.bpw,
            "--tokens",
            str(args.tokens),
            "--device",
            args.device,
            "--out",
            f"{tmp}/model",
            "--generated-dir",
            f"{tmp}/generated",  # a fresh cache: the generation is part of the measured time
            *args.extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    plan = [line for line in proc.stderr.splitlines() if line.startswith(("plan:", "  "))]
    record = {
        "command": "littlebit " + " ".join(command[3:]).replace(tmp, "TMP"),
        "tokens": args.tokens,
        "completed": True,
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 2),
        "plan": plan,
        "summary": json.loads(proc.stdout.strip().splitlines()[-1]),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "processor": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    append(Path(args.out), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
