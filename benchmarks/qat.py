"""QAT benchmark: held-out quality after distillation on a fixed token budget.

One process loads the teacher once and trains one student per (bpw, init, variant), each within
``--tokens`` training tokens (calibration and block reconstruction counted), then evaluates it on
text the training never saw (``heldout.py``): WikiText-2 and PTB test (whole splits, seqlen 2048)
and PIQA (whole validation split), with their ratios to the FP model, scored once per process, and
the headline (their geometric mean). Results are appended to the JSON file after every run, so a
run cut short keeps what it finished.

    python benchmarks/qat.py --bpw 1.0 0.55 0.3 --init itq dual-svid --out benchmarks/results/qat.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import heldout  # noqa: E402
import torch  # noqa: E402

import littlebit.training.trainer as train_module  # noqa: E402
from littlebit.config import LittleBitConfig  # noqa: E402
from littlebit.core.convert import budget  # noqa: E402
from littlebit.evaluation.perplexity import perplexity, tokenize_eval  # noqa: E402
from littlebit.hf.models import load_model, load_tokenizer  # noqa: E402
from littlebit.training.config import (
    BlockConfig,  # noqa: E402
    LearningRates,  # noqa: E402
    TrainConfig,  # noqa: E402
)
from littlebit.training.stream import load_tokens  # noqa: E402
from littlebit.training.student import make_student  # noqa: E402
from littlebit.training.trainer import train  # noqa: E402

# Named variants for ablations; "default" is the recipe TrainConfig() describes.
VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": {  # the paper's recipe: plain init, summed-MSE loss, no block stage, frozen norms
        "act_power": 0.0,
        "latent_rms": None,
        "blocks": {"sequences": 0},
        "loss": {"form": "paper"},
        "train_norms": False,
        "lrs": {"latent": 4e-5, "scale": 4e-5, "norm": 4e-5, "relative": False},
    },
    "no-blocks": {"blocks": {"sequences": 0}},
    "small-blocks": {"blocks": {"sequences": 32, "epochs": 4}},
    "big-blocks": {"blocks": {"sequences": 128, "epochs": 4}},  # the block stage of OLD_DEFAULT
    "huge-blocks": {"blocks": {"sequences": 256, "epochs": 4}},
    "no-act": {"act_power": 0.0},
    # The latent-lr ablations ran with the earlier 32-sequence block stage; pinned to reproduce them.
    "latent-3x": {"lrs": {"latent": 3e-4}, "blocks": {"sequences": 32}},
    "latent-0.3x": {"lrs": {"latent": 3e-5}, "blocks": {"sequences": 32}},
    "hidden-0": {"loss": {"hidden_weight": 0.0}},
    # Sequences as long as the evaluation's (2048), same tokens per step and per block stage.
    "long-seq": {
        "seqlen": 2048,
        "batch_size": 2,
        "calib_sequences": 4,
        "blocks": {"sequences": 32, "batch_size": 1},
    },
    "scale-2.5x": {"lrs": {"scale": 5e-3}},
    "freeze-tail": {"freeze_signs_frac": 0.25},
    "blocks-lr1": {"blocks": {"lr_multiplier": 1.0}},
    # Same tokens in more, smaller steps: global batch 4 or 2 sequences, block batch 2.
    "global-b4": {"batch_size": 4},
    "global-b2": {"batch_size": 2},
    "blocks-b2": {"blocks": {"batch_size": 2}},
    "latent-rms-keep": {"latent_rms": None},
    # Throughput only: 30 steps of global distillation, no block stage, no evaluation curve.
    "speed": {"blocks": {"sequences": 0}, "act_power": 0.0},
    "speed-eager": {"blocks": {"sequences": 0}, "act_power": 0.0, "compile": False, "cuda_graphs": False},
    "speed-compiled": {"blocks": {"sequences": 0}, "act_power": 0.0, "compile": True, "cuda_graphs": False},
}
# The three changes above at once (their keys do not overlap).
VARIANTS["long-seq-combo"] = {**VARIANTS["long-seq"], **VARIANTS["scale-2.5x"], **VARIANTS["freeze-tail"]}
VARIANTS["b4-blocks-b2"] = {**VARIANTS["global-b4"], **VARIANTS["blocks-b2"]}
VARIANTS["huge-b4"] = {**VARIANTS["huge-blocks"], **VARIANTS["global-b4"]}

# Every variant above is pinned to an earlier recipe, OLD_DEFAULT (global batch 8; block stage of 128
# sequences in batches of 4; latent lr 1e-4; no clipping), so its recorded number reproduces;
# throughput ("speed*") is quoted at batch 8 x 512.
OLD_DEFAULT = {
    "batch_size": 8,
    "blocks": {"sequences": 128, "batch_size": 4},
    "lrs": {"latent": 1e-4},
    "max_grad_norm": None,
}


def _on(base: dict, over: dict) -> dict:
    nested = {k: {**base[k], **v} for k, v in over.items() if isinstance(v, dict) and k in base}
    return {**base, **over, **nested}


VARIANTS = {name: over if name == "default" else _on(OLD_DEFAULT, over) for name, over in VARIANTS.items()}
VARIANTS["old-default"] = dict(OLD_DEFAULT)
# What helped at 1.0 BPW, together: global batch 2, block stage of 256 sequences in batches of 2 (as
# in TrainConfig()); with one path of about twice the rank instead of the residual pair.
VARIANTS["small-steps"] = {
    "batch_size": 2,
    "blocks": {"sequences": 256, "batch_size": 2},
    "lrs": {"latent": 1e-4},  # TrainConfig() uses 6e-5 ("latent-0.6x")
    "max_grad_norm": None,  # TrainConfig() clips at 1 ("latent-0.6x-clip1"); the variants below do not
}
VARIANTS["small-steps-single-path"] = {**VARIANTS["small-steps"], "littlebit": {"residual": False}}
# One path with global batch 1 (2160 steps for the same tokens): the next step along "smaller steps".
VARIANTS["b1-single-path"] = {**VARIANTS["small-steps-single-path"], "batch_size": 1}
# 1.0 BPW: learning rates re-tuned for the small steps (they were tuned at global batch 8 and, for the
# block stage, at 32 steps per layer instead of 512), and a block stage that sees twice the distinct
# sequences for the same tokens.
_SMALL_BLOCKS = VARIANTS["small-steps"]["blocks"]
VARIANTS["blocks-lr2"] = {**VARIANTS["small-steps"], "blocks": {**_SMALL_BLOCKS, "lr_multiplier": 2.0}}
VARIANTS["latent-0.6x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 6e-5}}
VARIANTS["lrs-0.6x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 6e-5, "scale": 1.2e-3, "norm": 1.2e-3}}
VARIANTS["latent-0.4x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 4e-5}}
VARIANTS["latent-0.25x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 2.5e-5}}
VARIANTS["latent-0.6x-seed1"] = {**VARIANTS["latent-0.6x"], "seed": 1}
VARIANTS["latent-0.4x-seed1"] = {**VARIANTS["latent-0.4x"], "seed": 1}
VARIANTS["latent-0.6x-hidden0.3"] = {**VARIANTS["latent-0.6x"], "loss": {"hidden_weight": 0.3}}
VARIANTS["latent-0.6x-hidden0.1"] = {**VARIANTS["latent-0.6x"], "loss": {"hidden_weight": 0.1}}
# More of the budget in the block stage, at latent rate 6e-5 (fewer global steps for the same tokens).
_BLOCKS_384 = {**_SMALL_BLOCKS, "sequences": 384}
VARIANTS["latent-0.6x-blocks384"] = {**VARIANTS["latent-0.6x"], "blocks": _BLOCKS_384}
VARIANTS["latent-0.6x-blocks256x6"] = {**VARIANTS["latent-0.6x"], "blocks": {**_SMALL_BLOCKS, "epochs": 6}}
VARIANTS["latent-0.6x-hidden0.3-blocks384"] = {**VARIANTS["latent-0.6x-hidden0.3"], "blocks": _BLOCKS_384}
# A wider SmoothSign window (alpha x latent RMS = 1 instead of 2), so more latents
# far from zero still get a gradient above Adam's epsilon.
VARIANTS["latent-0.6x-alpha50"] = {**VARIANTS["latent-0.6x"], "littlebit": {"smooth_alpha": 50.0}}
# On latent-0.6x: faster block steps (lr x8 instead of x5; x2 was worse),
# activation statistics from 64 calibration sequences instead of 16, and gradient clipping at norm 1.
_LATENT = VARIANTS["latent-0.6x"]
VARIANTS["latent-0.6x-blocks-lr8"] = {**_LATENT, "blocks": {**_SMALL_BLOCKS, "lr_multiplier": 8.0}}
VARIANTS["latent-0.6x-calib64"] = {**_LATENT, "calib_sequences": 64}
VARIANTS["latent-0.6x-clip1"] = {**_LATENT, "max_grad_norm": 1.0}
VARIANTS["latent-0.6x-clip1-seed1"] = {**VARIANTS["latent-0.6x-clip1"], "seed": 1}
VARIANTS["blocks-512x2"] = {
    **VARIANTS["small-steps"],
    "blocks": {**_SMALL_BLOCKS, "sequences": 512, "epochs": 2},
}

# Joint-ITQ initialisation of a 1.0 BPW student takes ~45 s on the H100; variants that differ only in
# training reuse it (the initial student depends on the teacher, the LittleBit config, the
# calibration tokens and the two init knobs, nothing else).
_INIT_CACHE: dict[tuple, torch.nn.Module] = {}
_INIT_REUSED = [False]  # whether the latest student came from the cache (its setup time is not init)


def cached_make_student(teacher, config, calibration=None, act_power=1.0, latent_rms=None, progress=True):
    calib_key = None if calibration is None else (tuple(calibration.shape), int(calibration.sum()))
    key = (config.to_json(), calib_key, act_power, latent_rms)
    _INIT_REUSED[0] = key in _INIT_CACHE
    if key not in _INIT_CACHE:
        _INIT_CACHE.clear()  # one cached student at a time: they are the size of the model
        _INIT_CACHE[key] = make_student(teacher, config, calibration, act_power, latent_rms, progress)
    return copy.deepcopy(_INIT_CACHE[key])


def train_config(variant: str, args: argparse.Namespace, lb: LittleBitConfig) -> TrainConfig:
    base = TrainConfig(seqlen=args.seqlen, eval_seqlen=2048, eval_windows=args.curve_windows)
    over = dict(VARIANTS[variant])
    if args.batch_size:  # the command line wins over the variant's pinned batch
        over["batch_size"] = args.batch_size
    over.pop("littlebit", None)  # compression settings, not training ones (see run_one)
    for key, cls in (("lrs", LearningRates), ("blocks", BlockConfig)):
        if key in over:
            over[key] = cls(**{**dataclasses.asdict(getattr(base, key)), **over[key]})
    if "loss" in over:
        over["loss"] = dataclasses.replace(base.loss, **over["loss"])
    cfg = dataclasses.replace(base, **over)
    calib = cfg.calib_sequences * cfg.seqlen if cfg.act_power else 0
    left = args.tokens - calib - cfg.blocks.tokens(cfg.seqlen)
    steps = max(0, left // cfg.tokens_per_step)
    if variant.startswith("speed"):
        return dataclasses.replace(cfg, steps=30, eval_every=0, eval_windows=1, save_every=0)
    return dataclasses.replace(cfg, steps=steps, eval_every=max(1, steps // args.curve_points), save_every=0)


def littlebit_config(bpw: float, init: str, variant: str) -> LittleBitConfig:
    return LittleBitConfig(bpw=bpw, init=init, **VARIANTS[variant].get("littlebit", {}))


def config_fields(teacher, lb: LittleBitConfig, cfg: TrainConfig, variant: str, history, args) -> dict:
    """A record's fields that follow from its configs and from the evaluations along the run."""
    return {
        "bpw_linear": round(budget(teacher, lb).bpw_linear, 4),
        "eval": f"wikitext2 test, seqlen 2048, {args.final_windows or 'all'} windows",
        "steps": cfg.steps,
        "command": f"python3 benchmarks/qat.py --runs {lb.bpw}:{lb.init} --variant {variant}",
        "curve": [
            {"tokens": h["tokens"], "ppl": round(h["ppl"], 3), "windows": args.curve_windows}
            for h in history
            if math.isfinite(h["ppl"])
        ],
        "train_config": cfg.to_dict(),
        "littlebit_config": lb.to_dict(),
    }


def run_one(bpw: float, init: str, variant: str, ctx: dict, args: argparse.Namespace) -> dict:
    """Train and evaluate one student; returns its record (an ``error`` record if it failed)."""
    lb = littlebit_config(bpw, init, variant)
    cfg = train_config(variant, args, lb)
    tag = f"{bpw}-{init}-{variant}"
    print(f"=== {tag}: {cfg.steps} steps", flush=True)
    t0 = time.perf_counter()
    device = ctx["device"]
    try:
        work = f"{args.work}/{tag}"
        res = train(
            ctx["teacher"], ctx["data"], lb, cfg, work, ctx["tokenizer"], ctx["eval_ids"], progress=False
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            ppl = perplexity(res.student, ctx["eval_ids"], 2048, args.final_windows, progress=False)
        held = {}
        if ctx["fp"] is not None:
            held = heldout.evaluate(res.student, ctx["tokenizer"], ctx["heldout_ids"], **ctx["heldout_args"])
            held.update(heldout.ratios(held, ctx["fp"]))
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
        "tokens": res.tokens,
        "wikitext2_ppl": round(ppl, 3),
        "heldout": held,
        "tokens_per_s": round(res.tokens_per_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "timings_s": {k: round(v, 1) for k, v in res.timings.items()},
        "init_reused": _INIT_REUSED[0],
        "device": ctx["name"],
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **config_fields(ctx["teacher"], lb, cfg, variant, res.history, args),
    }


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
        lb = littlebit_config(rec["bpw_target"], rec["init"], rec["variant"])
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


def _today() -> str:
    return datetime.date.today().isoformat()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, nargs="+", default=[1.0, 0.55, 0.3])
    ap.add_argument("--init", nargs="+", default=["itq", "dual-svid"])
    ap.add_argument("--runs", nargs="+", default=None, help="BPW:INIT pairs, in order (instead of the grid)")
    ap.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--tokens", type=int, default=1_638_400, help="training token budget per run")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="global batch, overriding the variant's")
    ap.add_argument("--curve-points", type=int, default=4, help="evaluations along the run")
    ap.add_argument("--curve-windows", type=int, default=16, help="2048-token windows per curve point")
    ap.add_argument("--final-windows", type=int, default=None, help="cap the final evaluation (smoke tests)")
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--heldout",
        default="wikitext2,ptb,piqa",
        help="held-out evaluations of every run and of FP: test texts and lm-eval tasks ('' for none)",
    )
    ap.add_argument("--task-limit", type=int, default=None, help="questions per task (smoke tests)")
    ap.add_argument("--out", default="benchmarks/results/qat.json")
    ap.add_argument("--work", default="/tmp/littlebit-qat")
    ap.add_argument("--logs", default=None, help="append every run's training log to this JSONL file")
    ap.add_argument(
        "--reuse-init", action="store_true", help="share one initial student among variants of a BPW/init"
    )
    ap.add_argument(
        "--records-from-logs",
        nargs=2,
        metavar=("FOLDER", "LIKE_JSON"),
        help="append records rebuilt from the logs in FOLDER (machine fields from LIKE_JSON's first record)",
    )
    args = ap.parse_args()
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
    ctx["data"] = load_tokens(None, tokenizer)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    wanted = [n for n in args.heldout.split(",") if n]
    texts = tuple(n for n in wanted if n in heldout.TEXTS)
    ctx["heldout_ids"] = heldout.test_ids(tokenizer, texts)
    ctx["heldout_args"] = {
        "tasks": tuple(n for n in wanted if n not in texts),
        "max_windows": args.final_windows,
        "task_limit": args.task_limit,
    }
    ctx["fp"] = None
    if wanted:
        ctx["fp"] = heldout.evaluate(ctx["teacher"], tokenizer, ctx["heldout_ids"], **ctx["heldout_args"])
        records.append({"variant": "fp", "heldout": ctx["fp"], "device": ctx["name"], "date": _today()})
        print(json.dumps(records[-1]), flush=True)
    pairs = [(float(r.split(":")[0]), r.split(":")[1]) for r in args.runs or []]
    pairs = pairs or [(bpw, init) for bpw in args.bpw for init in args.init]
    for bpw, init in pairs:
        for variant in args.variant:
            rec = run_one(bpw, init, variant, ctx, args)
            records.append(rec)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))
            keys = ("bpw_target", "init", "variant", "tokens", "wikitext2_ppl", "heldout", "tokens_per_s")
            print(json.dumps({k: rec[k] for k in keys if k in rec}), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
