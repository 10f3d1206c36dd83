"""QAT benchmark: held-out quality after distillation on a fixed token budget.

One process loads the teacher once and trains one student per (bpw, init, variant), each within
``--tokens`` training tokens (calibration and block reconstruction counted), then evaluates it on
held-out text and a task: WikiText-2 test and PTB test (whole splits, seqlen 2048) and PIQA (all
1,838 validation questions). The FP model is evaluated the same way once per process. Each record
holds the scores, their ratios to FP (higher is worse: ppl / FP ppl, and FP acc / acc for PIQA) and
the headline, their geometric mean: a recipe is better only if its headline is lower. Results are
appended to the JSON file after every run, so a run cut short keeps what it finished; records
written before the held-out scores existed lack those fields and stay readable.

    python benchmarks/qat.py --bpw 1.0 0.55 0.3 --init itq dual-svid --out benchmarks/results/qat.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from qat_variants import RECIPE, VARIANTS  # noqa: E402

import littlebit.training.trainer as train_module  # noqa: E402
from littlebit.config import LittleBitConfig  # noqa: E402
from littlebit.core.convert import budget  # noqa: E402
from littlebit.evaluation.heldout import PARTS, RATIO_CONVENTION, headline, held_out_scores, ratios  # noqa: E402
from littlebit.evaluation.perplexity import tokenize_eval  # noqa: E402
from littlebit.evaluation.tasks import load_tasks  # noqa: E402
from littlebit.hf.models import load_model, load_tokenizer  # noqa: E402
from littlebit.training.config import BlockConfig, LearningRates, TextGenConfig, TrainConfig  # noqa: E402
from littlebit.training.data_spec import default_data_spec  # noqa: E402
from littlebit.training.recipe import BLOCK_SHARE, default_layout, plan_budget  # noqa: E402
from littlebit.training.student import make_student  # noqa: E402
from littlebit.training.trainer import train  # noqa: E402

# Joint-ITQ initialisation of a 1.0 BPW student takes ~45 s on the H100; variants that differ only in
# training reuse it (the initial student depends on the teacher, the LittleBit config, the
# calibration tokens and the three init knobs, nothing else).
_INIT_CACHE: dict[tuple, torch.nn.Module] = {}
_INIT_REUSED = [False]  # whether the latest student came from the cache (its setup time is not init)


def cached_make_student(
    teacher, config, calibration=None, act_power=1.0, latent_rms=None, progress=True, grad_power=0.0
):
    calib_key = None if calibration is None else (tuple(calibration.shape), int(calibration.sum()))
    key = (config.to_json(), calib_key, act_power, latent_rms, grad_power)
    _INIT_REUSED[0] = key in _INIT_CACHE
    if key not in _INIT_CACHE:
        _INIT_CACHE.clear()  # one cached student at a time: they are the size of the model
        _INIT_CACHE[key] = make_student(
            teacher, config, calibration, act_power, latent_rms, progress, grad_power
        )
    return copy.deepcopy(_INIT_CACHE[key])


def train_config(variant: str, args: argparse.Namespace, lb: LittleBitConfig) -> TrainConfig:
    base = TrainConfig(
        seqlen=args.seqlen, eval_seqlen=2048, eval_windows=args.curve_windows, grad_power=args.grad_power
    )
    over = dict(VARIANTS[variant])
    if args.batch_size:  # the command line wins over the variant's pinned batch
        over["batch_size"] = args.batch_size
    # Not TrainConfig fields: compression settings (see run_one), the data spec, the block share.
    for key in ("littlebit", "data", "block_share"):
        over.pop(key, None)
    for key, cls in (("lrs", LearningRates), ("blocks", BlockConfig), ("generation", TextGenConfig)):
        if key in over:
            over[key] = cls(**{**dataclasses.asdict(getattr(base, key)), **over[key]})
    if "loss" in over:
        over["loss"] = dataclasses.replace(base.loss, **over["loss"])
    if over.get("data_tokens") == "half":
        over["data_tokens"] = args.tokens // 2
    cfg = dataclasses.replace(base, **over)
    # Generated sequences as long as the training ones, seeded like the run's data order.
    gen = dataclasses.replace(cfg.generation, length=cfg.seqlen, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, generation=gen, save_every=args.save_every)
    if variant.startswith("speed"):
        quiet = {"eval_every": 0, "eval_windows": 1, "save_every": 0, "save_interval_s": 0}
        return dataclasses.replace(cfg, steps=30, **quiet)
    if variant in RECIPE:
        cfg = plan_budget(cfg, args.tokens, VARIANTS[variant].get("block_share", BLOCK_SHARE))
    else:
        calib = cfg.calib_sequences * cfg.seqlen if cfg.uses_calibration else 0
        left = args.tokens - calib - cfg.blocks.tokens(cfg.seqlen)
        cfg = dataclasses.replace(cfg, steps=max(0, left // cfg.tokens_per_step))
    every = max(1, cfg.steps // args.curve_points) if args.curve_points > 0 else 0  # 0: no curve
    return dataclasses.replace(cfg, eval_every=every)


def data_spec(variant: str, args: argparse.Namespace) -> str:
    """The variant's data spec; recipe variants without one use the library's default mixture, the
    older ones the WikiText-2 validation split they were measured on (``--data`` overrides both)."""
    if args.data:
        return args.data
    if "data" in VARIANTS[variant]:
        return VARIANTS[variant]["data"]
    return default_data_spec(args.tokens) if variant in RECIPE else "wikitext2:valid"


def littlebit_config(bpw: float, init: str, variant: str, tokens: int) -> LittleBitConfig:
    """Recipe variants take ``littlebit train``'s layer layout for a budget of ``tokens`` unless they
    name one; the older ones the residual pair they were measured with."""
    over = dict(VARIANTS[variant].get("littlebit", {}))
    if variant in RECIPE:
        over = {**default_layout(tokens), **over}
    return LittleBitConfig(bpw=bpw, init=init, **over)


def _eval_flags(args) -> str:
    """The flags that cut or change the evaluation, as given (a record must say how it was scored)."""
    flags = [("--final-windows", args.final_windows), ("--piqa-limit", args.piqa_limit)]
    flags += [("--curve-points", args.curve_points)] if args.curve_points != 4 else []
    flags += [("--grad-power", args.grad_power)] if args.grad_power else []  # init, like BPW:INIT
    out = "".join(f" {flag} {value}" for flag, value in flags if value is not None)
    return out + (" --no-ptb" if args.no_ptb else "") + (" --no-piqa" if args.no_piqa else "")


def config_fields(teacher, lb: LittleBitConfig, cfg: TrainConfig, variant: str, history, args) -> dict:
    """A record's fields that follow from its configs and from the evaluations along the run."""
    return {
        "bpw_linear": round(budget(teacher, lb).bpw_linear, 4),
        "eval": f"test splits ({'wikitext2' if args.no_ptb else 'wikitext2, ptb'}), seqlen 2048, "
        f"{args.final_windows or 'all'} windows"
        + ("" if args.no_piqa else f"; piqa validation, {args.piqa_limit or 'all'} questions"),
        "steps": cfg.steps,
        "command": f"python3 benchmarks/qat.py --runs {lb.bpw}:{lb.init} --variant {variant} "
        f"--tokens {args.tokens}" + _eval_flags(args),
        "curve": [
            {"tokens": h["tokens"], "ppl": round(h["ppl"], 3), "windows": args.curve_windows}
            for h in history
            if math.isfinite(h["ppl"])
        ],
        "train_config": cfg.to_dict(),
        "littlebit_config": lb.to_dict(),
    }


def held_out(model, ctx: dict, args: argparse.Namespace) -> dict:
    """The held-out scores of ``model`` (whole splits unless the smoke-test flags cut them)."""
    return held_out_scores(
        model,
        ctx["tokenizer"],
        ctx["parts"],
        2048,
        args.final_windows,
        args.piqa_limit,
        args.piqa_batch_size,
        eval_ids=ctx["eval_sets"],
    )


def quality_fields(scores: dict, fp: dict) -> dict:
    """Scores, their ratios to FP and the headline, rounded for the record."""
    part_ratios = ratios(scores, fp)
    return {
        **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
        "ratios": {k: round(v, 4) for k, v in part_ratios.items()},
        "headline": round(headline(part_ratios), 4),
        "ratio_convention": RATIO_CONVENTION,
        "fp": {k: round(v, 4) for k, v in fp.items() if isinstance(v, float)},
    }


def run_one(bpw: float, init: str, variant: str, ctx: dict, args: argparse.Namespace) -> dict:
    """Train and evaluate one student; returns its record (an ``error`` record if it failed)."""
    lb = littlebit_config(bpw, init, variant, args.tokens)
    cfg = train_config(variant, args, lb)
    data = data_spec(variant, args)
    tag = f"{bpw}-{init}-{variant}"
    print(f"=== {tag}: {cfg.steps} steps, data {data}", flush=True)
    t0 = time.perf_counter()
    try:
        work = f"{args.work}/{tag}"
        res = train(
            ctx["teacher"],
            data,
            lb,
            cfg,
            work,
            ctx["tokenizer"],
            ctx["eval_ids"],
            resume=args.resume,
            progress=False,
            data_cache=args.generated_dir,
        )
        t_eval = time.perf_counter()
        scores = held_out(res.student, ctx, args)
        eval_seconds = time.perf_counter() - t_eval
    except Exception:  # keep the other runs going; the record says what failed
        traceback.print_exc()
        return {"bpw_target": bpw, "init": init, "variant": variant, "error": traceback.format_exc(-1)}
    log_file = Path(work) / "train_log.jsonl"
    if args.logs and log_file.is_file():
        with open(args.logs, "a", encoding="utf-8") as f:
            for line in log_file.read_text().splitlines():
                f.write(json.dumps({"run": tag, **json.loads(line)}) + "\n")
    return {
        "bpw_target": bpw,
        "init": init,
        "variant": variant,
        "data": data,
        "tokens": res.tokens,
        **quality_fields(scores, ctx["fp"]),
        # None where no global step was timed (a run resumed after its last step): JSON has no NaN
        "tokens_per_s": round(res.tokens_per_s, 1) if math.isfinite(res.tokens_per_s) else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "eval_seconds": round(eval_seconds, 1),
        "timings_s": {k: round(v, 1) for k, v in res.timings.items()},
        "resumed": args.resume,
        "init_reused": _INIT_REUSED[0],
        "device": ctx["name"],
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **config_fields(ctx["teacher"], lb, cfg, variant, res.history, args),
    }


def print_table(records: list[dict]) -> None:
    """This process's runs, FP first: scores, ratios to FP and the headline (lower is better)."""
    cols = ("wikitext2_ppl", "ptb_ppl", "piqa_acc", "headline")
    print(f"{'run':<40}" + "".join(f"{c:>15}" for c in cols) + "   ratios (wikitext2, ptb, piqa)")
    if records and "fp" in records[0]:
        fp = records[0]["fp"]
        print(f"{'FP':<40}" + "".join(f"{fp.get(c, 1.0):>15.4g}" for c in cols))
    for r in records:
        tag = f"{r['bpw_target']}-{r['init']}-{r['variant']}"
        if "error" in r:
            print(f"{tag:<40} failed")
            continue
        cells = "".join(f"{r[c]:>15.4g}" if isinstance(r.get(c), float) else f"{'-':>15}" for c in cols)
        print(f"{tag:<40}{cells}   {', '.join(f'{v:.3f}' for v in r.get('ratios', {}).values())}")


def records_from_logs(folder: Path, like: dict, args: argparse.Namespace) -> list[dict]:
    """Rebuild the records of runs whose JSON file was lost, from what else they wrote.

    Each ``NAME.log`` (this script's stdout: the summary line) and ``logs_NAME.jsonl`` (``--logs``:
    the evaluations along the run) of a run gives one record; the configs are recomputed from the
    variant, and the machine fields (device, torch, date) come from ``like``, a record of the same
    GPU call. Per-phase timings are not in the logs and stay out. A run whose log disagrees with the
    recomputed config (steps, tokens) is refused rather than recorded with the wrong settings.
    """
    teacher = load_model(args.model, device="cpu")
    out = []
    for log_path in sorted(folder.glob("*.log")):
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        evals = folder / f"logs_{log_path.stem}.jsonl"
        if not lines or "error" in lines[-1] or not evals.is_file():
            continue
        rec = lines[-1]
        lb = littlebit_config(rec["bpw_target"], rec["init"], rec["variant"], args.tokens)
        cfg = train_config(rec["variant"], args, lb)
        history = [json.loads(x) for x in evals.read_text().splitlines()]
        steps_run = sum(h.get("phase") == "global" for h in history)
        if (steps_run, rec["tokens"]) != (cfg.steps, args.tokens):
            raise SystemExit(
                f"{log_path}: {steps_run} steps / {rec['tokens']} tokens, but the variant now "
                f"gives {cfg.steps} / {args.tokens}: pass the run's own options"
            )
        evals_along = [h for h in history if h.get("phase") == "eval"]
        rec.update(
            config_fields(teacher, lb, cfg, rec["variant"], evals_along, args),
            device=like["device"],
            date=like["date"],
            torch=like["torch"],
            rebuilt_from=f"{log_path.name} and {evals.name} (the run's JSON did not come back from the GPU)",
        )
        out.append(rec)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, nargs="+", default=[1.0, 0.55, 0.3])
    ap.add_argument("--init", nargs="+", default=["itq", "dual-svid"])
    ap.add_argument("--runs", nargs="+", default=None, help="BPW:INIT pairs, in order (instead of the grid)")
    ap.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--tokens", type=int, default=1_638_400, help="training token budget per run")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="global batch, overriding the variant's")
    ap.add_argument("--curve-points", type=int, default=4, help="evaluations along the run (0: none)")
    ap.add_argument("--curve-windows", type=int, default=16, help="2048-token windows per curve point")
    ap.add_argument("--final-windows", type=int, default=None, help="cap the final evaluation (smoke tests)")
    ap.add_argument(
        "--no-ptb", action="store_true", help="leave PTB out of the held-out scores (smoke tests)"
    )
    ap.add_argument(
        "--no-piqa", action="store_true", help="leave PIQA out of the held-out scores (smoke tests)"
    )
    ap.add_argument("--piqa-limit", type=int, default=None, help="first N PIQA questions only (smoke tests)")
    ap.add_argument("--piqa-batch-size", type=int, default=32)
    ap.add_argument("--data", default=None, help="data spec for every run, overriding the variants'")
    ap.add_argument("--generated-dir", default=None, help="cache of generated text (default: the library's)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from the newest checkpoint in its work dir (runs longer than one command)",
    )
    ap.add_argument(
        "--save-every", type=int, default=0, help="also a checkpoint every N global steps and block layer"
    )
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--fp-scores",
        help="JSON file of the FP model's held-out scores: read if there, else written (parallel runs)",
    )
    ap.add_argument("--out", default="benchmarks/results/qat.json")
    ap.add_argument("--work", default="/tmp/littlebit-qat")
    ap.add_argument("--logs", default=None, help="append every run's training log to this JSONL file")
    ap.add_argument(
        "--grad-power",
        type=float,
        default=0.0,
        help="weight output rows at init by the teacher's loss-gradient RMS to this power (every run)",
    )
    ap.add_argument(
        "--reuse-init", action="store_true", help="share one initial student among variants of a BPW/init"
    )
    ap.add_argument(
        "--records-from-logs",
        nargs=2,
        metavar=("FOLDER", "LIKE_JSON"),
        help="append records rebuilt from the logs in FOLDER (machine fields from LIKE_JSON's first record)",
    )
    return ap


def main() -> int:
    args = build_parser().parse_args()
    if args.records_from_logs:
        folder, like = (
            Path(args.records_from_logs[0]),
            json.loads(Path(args.records_from_logs[1]).read_text())[0],
        )
        out = Path(args.out)
        records = json.loads(out.read_text()) if out.is_file() else []
        have = {r.get("rebuilt_from") for r in records}
        records += [r for r in records_from_logs(folder, like, args) if r["rebuilt_from"] not in have]
        out.write_text(json.dumps(records, indent=1))
        return 0

    if args.reuse_init:
        train_module.make_student = cached_make_student
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = {"device": device, "name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    ctx["teacher"] = load_model(args.model, device=device)
    ctx["tokenizer"] = tokenizer = load_tokenizer(args.model)
    ctx["eval_ids"] = tokenize_eval(tokenizer, "wikitext2", "test")
    ctx["parts"] = tuple(p for p in PARTS if not (p == "ptb" and args.no_ptb or p == "piqa" and args.no_piqa))
    ctx["eval_sets"] = {"wikitext2": ctx["eval_ids"]}
    if "ptb" in ctx["parts"]:
        ctx["eval_sets"]["ptb"] = tokenize_eval(tokenizer, "ptb", "test")
    if "piqa" in ctx["parts"]:  # its data checked now, not after minutes of training (FP may be cached)
        load_tasks(["piqa"])
    # The FP model once per process: every record carries it, and its ratios are to it.
    t0 = time.perf_counter()
    # The FP scores of another run are reused only if they scored the same model on the same parts.
    fp_key = {"model": args.model, "parts": list(ctx["parts"]), "final_windows": args.final_windows}
    fp_key["piqa_limit"] = args.piqa_limit
    fp_file = Path(args.fp_scores) if args.fp_scores else None
    saved = json.loads(fp_file.read_text()) if fp_file is not None and fp_file.is_file() else {}
    if saved.get("key") == fp_key:
        ctx["fp"] = saved["scores"]
    else:
        ctx["fp"] = held_out(ctx["teacher"], ctx, args)
        if fp_file is not None:
            tmp = fp_file.with_name(f".{fp_file.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"key": fp_key, "scores": ctx["fp"]}))
            os.replace(tmp, fp_file)
    print(f"FP: {json.dumps(ctx['fp'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    pairs = [(float(r.split(":")[0]), r.split(":")[1]) for r in args.runs or []]
    pairs = pairs or [(bpw, init) for bpw in args.bpw for init in args.init]
    mine = []
    for bpw, init in pairs:
        for variant in args.variant:
            rec = run_one(bpw, init, variant, ctx, args)
            records.append(rec)
            mine.append(rec)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))
            keys = ("bpw_target", "init", "variant", "tokens", "wikitext2_ppl", "ptb_ppl", "piqa_acc")
            keys += ("headline", "tokens_per_s", "seconds")
            print(json.dumps({k: rec[k] for k in keys if k in rec}), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    print_table(mine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
