"""Evaluation time of the default model, FP against packed LittleBit, side by side in one process.

Two workloads, each what ``littlebit eval`` runs (model loading and compression are not timed):

- WikiText-2 test perplexity: the first ``--windows`` windows of 2048 tokens in one call of
  ``evaluation.perplexity``, every model the same windows; on a GPU both with the windows replayed from
  a recorded CUDA graph (what ``littlebit eval`` does) and eager (``wikitext_eager``);
- PIQA as lm-eval runs it (``evaluation.tasks``, lm-eval's HF model, batches of 16 short sequences),
  the first ``--limit`` questions, timed whole and inside the model's forward calls.

Repetitions are interleaved (FP, packed, packed, FP, ... in rotating order), so load from other jobs on
a shared machine falls on every model alike; medians and packed/FP ratios are reported, of wall-clock
time and of the process's CPU time (which other jobs on the machine disturb far less). The packed
models come from Dual-SVID without training (the time does not depend on the weights' values).

    python benchmarks/eval_speed.py                         # CPU, 0.55 and 1.0 BPW, 1 thread
    python benchmarks/eval_speed.py --device cuda --dtype bf16 --windows 8 --tag eval_speed_gpu

Results: benchmarks/results/eval_speed_cpu.json (``--tag`` names another).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(tag: str, device: str, dtype: torch.dtype):
    """``fp``: the default model as loaded; a BPW: compressed (``convert``) and packed, as
    ``littlebit compress`` then ``littlebit eval`` would run it."""
    from littlebit import LittleBitConfig, pack_model
    from littlebit.core.convert import convert
    from littlebit.hf.format import cast_unquantized
    from littlebit.hf.models import load_model

    model = load_model(None, torch.float32, device)
    if tag != "fp":
        convert(model, LittleBitConfig(bpw=float(tag)), compute_device=device, progress=False)
        pack_model(model)
    if dtype != torch.float32:
        cast_unquantized(model, dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_perplexity(
    model, ids: torch.Tensor, windows: int, seqlen: int, device: str, recorded: bool = True
) -> tuple[float, float, float]:
    """Wall-clock and process CPU seconds of one perplexity over the first ``windows`` windows (as
    ``littlebit eval`` runs it; ``recorded``: on a GPU, windows replayed from a recorded CUDA graph),
    and the perplexity."""
    from littlebit.evaluation.perplexity import perplexity

    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    ppl = perplexity(model, ids, seqlen, windows, progress=False, recorded=recorded)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, ppl


class ForwardTimer:
    """Seconds spent inside ``model``'s forward calls, wall clock and process CPU time (what differs
    between the models; lm-eval's own work around them, seconds a call, is the same for all)."""

    def __init__(self, model, device: str) -> None:
        self.wall, self.cpu, self.device = 0.0, 0.0, device
        self.on = False  # only around PIQA: a host sync inside a forward would stop its recording
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        if not self.on:
            return
        _sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _stop(self, *_) -> None:
        if not self.on:
            return
        _sync(self.device)
        self.wall += time.perf_counter() - self.t0
        self.cpu += time.process_time() - self.c0


def time_piqa(model, timer: ForwardTimer, tokenizer, limit: int, batch: int, device: str) -> tuple:
    """(seconds for the whole call, seconds in the model's forward, CPU seconds there, scores)."""
    from littlebit.evaluation.tasks import evaluate_tasks

    _sync(device)
    t0, wall, cpu = time.perf_counter(), timer.wall, timer.cpu
    timer.on = True
    try:
        scores = evaluate_tasks(model, tokenizer, ["piqa"], limit=limit, batch_size=batch)
    finally:
        timer.on = False
    _sync(device)
    return time.perf_counter() - t0, timer.wall - wall, timer.cpu - cpu, scores["piqa"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bpw", default="0.55,1.0", help="packed models to compare with FP")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 on a machine others share)")
    p.add_argument("--windows", type=int, default=3, help="WikiText-2 test windows of --seqlen")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=48, help="PIQA questions (2 sequences each)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each workload")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of workloads to leave out: wikitext (recorded windows), wikitext-eager, piqa",
    )
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    import littlebit.kernels
    from littlebit.evaluation.perplexity import tokenize_eval
    from littlebit.hf.models import load_tokenizer
    from littlebit.op import available_backends

    littlebit.kernels.register()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    tags = ["fp", *[t for t in args.bpw.split(",") if t]]
    tokenizer = load_tokenizer(None)
    models = {t: build(t, args.device, dtype) for t in tags}
    timers = {t: ForwardTimer(m, args.device) for t, m in models.items()}
    skip = set(args.skip.split(","))
    ids = tokenize_eval(tokenizer, "wikitext2", "test")
    windows = min(args.windows, ids.shape[1] // args.seqlen)
    if args.device == "cpu":  # nothing is recorded on the CPU
        skip.add("wikitext-eager")
    keys = ["wikitext_s", "wikitext_cpu_s", "wikitext_eager_s", "piqa_s", "piqa_model_s", "piqa_model_cpu_s"]
    per = {t: {k: [] for k in keys} for t in tags}
    load = []
    extra: dict[str, dict] = {t: {} for t in tags}
    with torch.no_grad():
        for t in tags:  # warm-up: first-call costs (allocations, lm-eval's task set-up) stay out
            time_perplexity(models[t], ids, 1, args.seqlen, args.device)
        for rep in range(args.reps):
            order = tags[rep % len(tags) :] + tags[: rep % len(tags)]
            for t in order:
                if "wikitext" not in skip:
                    wall, cpu, ppl = time_perplexity(models[t], ids, windows, args.seqlen, args.device)
                    per[t]["wikitext_s"].append(wall)
                    per[t]["wikitext_cpu_s"].append(cpu)
                    extra[t]["wikitext_ppl"] = ppl
                if "wikitext-eager" not in skip:
                    wall, _, ppl = time_perplexity(models[t], ids, windows, args.seqlen, args.device, False)
                    per[t]["wikitext_eager_s"].append(wall)
                    extra[t]["wikitext_eager_ppl"] = ppl
                if "piqa" not in skip:
                    s, s_model, s_cpu, scores = time_piqa(
                        models[t], timers[t], tokenizer, args.limit, args.batch, args.device
                    )
                    per[t]["piqa_s"].append(s)
                    per[t]["piqa_model_s"].append(s_model)
                    per[t]["piqa_model_cpu_s"].append(s_cpu)
                    extra[t]["piqa"] = scores
                load.append(os.getloadavg()[0])
                print(t, rep, {k: round(v[-1], 3) for k, v in per[t].items() if v}, flush=True)
    records = []
    for t in tags:
        rec = {"model": "fp" if t == "fp" else f"packed-{t}", **extra[t]}
        for key, vals in per[t].items():
            if vals:
                med = statistics.median(vals)
                base = statistics.median(per["fp"][key])
                rec.update({key: vals, f"{key}_median": med, f"{key}_vs_fp": med / base})
        records.append(rec)
    tag = args.tag or ("eval_speed_cpu" if args.device == "cpu" else "eval_speed_gpu")
    path = common.write_results(
        tag,
        records,
        dtype=args.dtype,
        threads=torch.get_num_threads() if args.device == "cpu" else None,
        wikitext_windows=windows,
        seqlen=args.seqlen,
        piqa_limit=args.limit,
        batch=args.batch,
        reps=args.reps,
        backends=available_backends(),
        load_average_1min=load,
        note="machine shared with other jobs; repetitions interleaved, medians",
    )
    cols = [c for c in keys if per["fp"][c]]
    print(f"\n{'model':<14}" + "".join(f" {c:>16} {'vs fp':>6}" for c in cols))
    for r in records:
        vals = "".join(f" {r.get(c + '_median', 0):>16.2f} {r.get(c + '_vs_fp', 0):>6.2f}" for c in cols)
        print(f"{r['model']:<14}{vals}")
    print(path)


if __name__ == "__main__":
    main()
