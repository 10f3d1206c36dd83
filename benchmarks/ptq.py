"""LittleBit without training vs the baselines on the default model.

WikiText-2 and PTB perplexity (seqlen 2048, whole test split) and PIQA (lm-eval's zero-shot task,
whole validation split) for the FP model, LittleBit (Dual-SVID, no training) at several BPW, fp16
truncated SVD at the same bit budget, and sign(W) with rank-1 scales (OneBit-style). Prints a table,
writes benchmarks/results/ptq.json.

    python benchmarks/ptq.py                  # on the GPU machine
    python benchmarks/ptq.py --compress-only  # time the 0.55 BPW compression alone (CPU acceptance)
"""

from __future__ import annotations

import argparse
import copy
import time

import common
import torch

from littlebit import LittleBitConfig
from littlebit.core.baselines import apply_baseline
from littlebit.core.convert import convert
from littlebit.evaluation.perplexity import perplexity, tokenize_eval
from littlebit.evaluation.tasks import evaluate_tasks
from littlebit.hf.models import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bpw", default="1.0,0.8,0.55,0.3,0.1")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--compress-only", action="store_true")
    p.add_argument("--tasks", default="piqa", help="lm-eval tasks scored for every model ('' for none)")
    p.add_argument("--task-limit", type=int, help="questions per task (default: the whole split)")
    p.add_argument("--task-batch-size", type=int, default=16)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_model(None, torch.float32, device)
    tok = load_tokenizer(None)
    bpws = [float(b) for b in args.bpw.split(",")]
    if args.compress_only:
        records = []
        for bpw in bpws:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = convert(model, LittleBitConfig(bpw=bpw), compute_device=device, progress=False)
            records.append(
                {
                    "method": "littlebit",
                    "bpw_target": bpw,
                    "bpw_linear": report.bpw_linear,
                    "compress_s": time.perf_counter() - t0,
                    "threads": torch.get_num_threads(),
                }
            )
            print(records[-1])
        common.write_results(f"compress_time_{device}", records)
        return

    ids = {name: tokenize_eval(tok, name, "test") for name in ("wikitext2", "ptb")}

    tasks = [t for t in args.tasks.split(",") if t]

    def ppl(model) -> dict[str, float]:
        out = {
            name: perplexity(model, x, args.seqlen, args.max_windows, progress=False)
            for name, x in ids.items()
        }
        if tasks:
            t0 = time.perf_counter()
            scores = evaluate_tasks(model, tok, tasks, limit=args.task_limit, batch_size=args.task_batch_size)
            out["tasks_s"] = time.perf_counter() - t0
            for task, metrics in scores.items():
                for key in ("acc", "acc_norm", "samples"):
                    out[f"{task}_{key}"] = metrics.get(key)
        return out

    records = [{"method": "fp", "bpw_target": None, "bpw_linear": 16.0, "bpw_total": 16.0, **ppl(base)}]
    print(records[-1])
    runs = [("littlebit", b) for b in bpws] + [("svd", b) for b in bpws] + [("onebit", 1.0)]
    for method, bpw in runs:
        model = copy.deepcopy(base)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if method == "littlebit":
            report = convert(model, LittleBitConfig(bpw=bpw), compute_device=device, progress=False)
        else:
            report = apply_baseline(model, method, bpw)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        rec = {
            "method": method,
            "bpw_target": bpw,
            "bpw_linear": report.bpw_linear,
            "bpw_total": report.bpw_total,
            "compress_s": elapsed,
            **ppl(model),
        }
        records.append(rec)
        print(rec, flush=True)
        del model
    common.write_results(
        "ptq",
        records,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        tasks=tasks,
        task_limit=args.task_limit,
        model="SmolLM2-135M-Instruct",
    )
    print(
        f"\n{'method':<10} {'target':>6} {'BPW lin':>8} {'BPW all':>8} {'wikitext2':>12} {'ptb':>12}"
        + "".join(f" {t + ' acc':>9}" for t in tasks)
        + f" {'time s':>7}"
    )
    for r in records:
        target = "-" if r["bpw_target"] is None else f"{r['bpw_target']:.2f}"
        print(
            f"{r['method']:<10} {target:>6} {r['bpw_linear']:>8.3f} {r['bpw_total']:>8.3f} "
            f"{r['wikitext2']:>12.2f} {r['ptb']:>12.2f}"
            + "".join(f" {r[t + '_acc']:>9.3f}" for t in tasks)
            + f" {r.get('compress_s', 0):>7.1f}"
        )


if __name__ == "__main__":
    main()
