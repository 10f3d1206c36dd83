"""Acceptance check: a training run killed with SIGKILL at random moments, resumed each time, must end
with the same weights, bit for bit, as a run that was never stopped.

A tiny random Llama (built from a config, no downloads) distils on random token ids on the CPU, one
thread, a checkpoint every few steps. Each leg runs in a subprocess, killed by a seeded schedule:
right after an optimizer step, in the middle of writing a checkpoint's tensors or its JSON, between
a new checkpoint and the pruning of old ones, or after a random delay. The next leg resumes with
``resume=True``. Then a leg resumes from the final checkpoint, which must change nothing.

    python scripts/kill_resume_check.py [--steps 300] [--kills 12] [--seed 0]

Prints a table and writes benchmarks/results/kill_resume_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RESULT = ROOT / "benchmarks" / "results" / "kill_resume_cpu.json"
# Hooked kills land where a checkpoint write is most fragile; "step" lands between checkpoints.
HOOKED = ("step", "tensors", "json", "prune")
# Scales and norms move fast enough at this rate that their RMS crosses the optimizer's bucket edges.
SCALE_LR = 2e-2


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(kind: str, target: int) -> None:
    """Make this process SIGKILL itself at global step ``target`` or at the first write after it."""
    from littlebit.training import checkpoints as train_state
    from littlebit.training.trainer import Trainer

    def reached(path) -> bool:
        name = Path(path).name  # state-global-000035.safetensors.tmp, state-global-000035.json
        return name.startswith("state-global-") and int(name.split("-")[2].split(".")[0]) >= target

    if kind == "step":
        orig_step = Trainer._train_step

        def step(self, *a):
            parts = orig_step(self, *a)
            if self.step + 1 == target:
                _kill_self()
            return parts

        Trainer._train_step = step
    elif kind == "tensors":
        orig_save = train_state.save_file

        def save_file(tensors, filename):
            orig_save(tensors, filename)
            if reached(filename):  # half the bytes on disk, as when a write is cut short
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                _kill_self()

        train_state.save_file = save_file
    elif kind == "json":
        orig_write = train_state._write_atomic

        def write_atomic(path, write):
            if path.suffix == ".json" and reached(path):
                path.with_name(path.name + ".tmp").write_text('{"phase": "glo')
                _kill_self()
            orig_write(path, write)

        train_state._write_atomic = write_atomic
    elif kind == "prune":
        orig_remove = train_state._remove

        def remove(json_path):
            newest = train_state.list_checkpoints(json_path.parent)[-1]
            if reached(newest):
                _kill_self()
            orig_remove(json_path)

        train_state._remove = remove


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from littlebit.config import LittleBitConfig
    from littlebit.training.config import BlockConfig, LearningRates, TrainConfig
    from littlebit.training.trainer import train

    torch.set_num_threads(1)  # bitwise comparisons: a matmul's result may depend on the thread split
    if args.kill:
        kind, target = args.kill.split(":")
        _install_kill(kind, int(target))
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    teacher = tf.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(
        steps=args.steps,
        seqlen=32,
        batch_size=4,
        blocks=BlockConfig(sequences=8, epochs=2, batch_size=4),
        calib_sequences=4,
        save_every=args.save_every,
        lrs=LearningRates(scale=SCALE_LR, norm=SCALE_LR),
    )
    res = train(teacher, tokens, LittleBitConfig(bpw=4.0), cfg, args.work, resume=args.resume, progress=False)
    save_file({k: v.detach().clone().contiguous() for k, v in res.student.state_dict().items()}, args.weights)


def _leg(args, work: Path, weights: Path, resume: bool, kill: str | None, delay: float | None) -> int:
    cmd = [sys.executable, __file__, "--child", "--work", str(work), "--weights", str(weights)]
    cmd += ["--steps", str(args.steps), "--save-every", str(args.save_every)]
    cmd += ["--resume"] if resume else []
    cmd += ["--kill", kill] if kill else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"leg failed with code {proc.returncode}:\n{err.decode()[-3000:]}")
    return proc.returncode


def _progress(work: Path) -> tuple[int, str, list[str]]:
    """(last global step logged, newest checkpoint, files a killed write left behind)."""
    log = work / "train_log.jsonl"
    steps = [0]
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("phase") == "global":
            steps.append(record["step"])
    jsons = sorted(work.glob("state-*.json"), key=lambda p: (p.name.split("-")[1], p.name))
    left = sorted(p.name for p in work.glob("state-*.tmp"))
    left += sorted(p.name for p in work.glob("state-*.safetensors") if not p.with_suffix(".json").exists())
    return max(steps), jsons[-1].stem if jsons else "-", left


def _same(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _regrouped(work: Path, scale_lr: float) -> bool:
    """Whether bucketing the newest checkpoint's trained values afresh would give other groups."""
    from littlebit.training.checkpoints import load_checkpoint
    from littlebit.training.config import LearningRates
    from littlebit.training.optim import param_groups

    tensors, meta, _ = load_checkpoint(work)
    saved = meta["optimizer"]["param_groups"]
    names = {
        k: [n for g in saved if g["kind"] == k for n in g["params"]] for k in ("latent", "scale", "norm")
    }
    kinds = {kind: [tensors[f"model.{n}"] for n in ns] for kind, ns in names.items()}
    name_of = {id(tensors[f"model.{n}"]): n for ns in names.values() for n in ns}
    fresh = param_groups(kinds, LearningRates(scale=scale_lr, norm=scale_lr))
    return {frozenset(name_of[id(t)] for t in g["params"]) for g in fresh} != {
        frozenset(g["params"]) for g in saved
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=7)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a fresh temporary one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kill", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    import tempfile

    base = Path(args.dir or tempfile.mkdtemp(prefix="kill-resume-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    _leg(args, base / "plain", base / "plain.safetensors", False, None, None)
    reference_s = time.perf_counter() - t0

    # Every kind of kill, in a seeded order.
    kinds = [(*HOOKED, "time")[i % (len(HOOKED) + 1)] for i in range(args.kills)]
    rng.shuffle(kinds)
    work, weights, kills, resume = base / "killed", base / "killed.safetensors", [], False
    t1 = time.perf_counter()
    while True:
        kill, delay = None, None
        if len(kills) < args.kills:
            kind = kinds[len(kills)]
            if kind == "time":  # a few seconds in: start-up, block stage or global steps
                delay = rng.uniform(2.5, 2.5 + reference_s / 4)
            else:
                # A random step ahead, the gaps spreading the kills left over the steps left.
                reached = _progress(work)[0] if resume else 0
                gap = 2 * (args.steps - reached) // (args.kills - len(kills) + 1)
                kill = f"{kind}:{reached + rng.randint(1, max(1, gap))}"
        rc = _leg(args, work, weights, resume, kill, delay)
        if rc == 0:
            break
        step, newest, left = _progress(work)
        what = kill or f"time:{delay:.1f}s"
        kills.append({"kill": what, "logged_step": step, "newest_checkpoint": newest, "left_behind": left})
        resume = True
    resumed_s = time.perf_counter() - t1
    identical = _same(base / "plain.safetensors", weights)
    # Resuming from the final checkpoint trains nothing more and must give the same weights again.
    _leg(args, work, base / "again.safetensors", True, None, None)
    final_resume_identical = _same(weights, base / "again.safetensors")
    regrouped = _regrouped(work, SCALE_LR)

    print(f"{'#':>3}  {'kill':<16} {'logged step':>11}  {'newest checkpoint':<22} left behind")
    for i, k in enumerate(kills, 1):
        left = ", ".join(k["left_behind"]) or "-"
        print(f"{i:>3}  {k['kill']:<16} {k['logged_step']:>11}  {k['newest_checkpoint']:<22} {left}")
    print(f"identical to the unbroken run: {identical}; after resuming at the end: {final_resume_identical}")
    print(f"recomputing the optimizer's groups from the final values would regroup tensors: {regrouped}")
    print(
        f"unbroken run {reference_s:.1f} s, killed and resumed {resumed_s:.1f} s over {len(kills) + 1} legs"
    )

    payload = {
        "date": datetime.date.today().isoformat(),
        "device": "cpu, 1 thread",
        "command": " ".join(["scripts/kill_resume_check.py", *sys.argv[1:]]),
        "steps": args.steps,
        "save_every": args.save_every,
        "seed": args.seed,
        "kills": kills,
        "identical": identical,
        "final_resume_identical": final_resume_identical,
        "groups_would_regroup": regrouped,
        "reference_s": round(reference_s, 1),
        "killed_and_resumed_s": round(resumed_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0 if identical and final_resume_identical else 1


if __name__ == "__main__":
    sys.exit(main())
