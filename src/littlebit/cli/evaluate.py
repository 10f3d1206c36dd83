"""``littlebit eval``: perplexity and lm-eval tasks of the default model, any Hugging Face model or a
LittleBit directory."""

from __future__ import annotations

import argparse
import json

from littlebit.cli.common import (
    DEFAULT_MODEL_HELP,
    DTYPES,
    UNVERIFIED_HELP,
    bpw_type,
    check_context,
    device_name,
    int_at_least,
    is_littlebit_dir,
    torch_dtype,
)
from littlebit.config import LittleBitError
from littlebit.evaluation.data import DATASETS, check_test_set
from littlebit.evaluation.hub import HUB_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help=f"a LittleBit directory, or {DEFAULT_MODEL_HELP}")
    p.add_argument(
        "--ppl",
        help=f"comma-separated test sets: {','.join(DATASETS)} (their test splits), a text file or folder, "
        f"or {HUB_HELP} (default: wikitext2, none with --tasks)",
    )
    p.add_argument(
        "--tasks", help="comma-separated lm-eval tasks, e.g. piqa,hellaswag,arc_easy (needs lm-eval)"
    )
    p.add_argument("--limit", type=int_at_least(1), help="only the first N examples of each task")
    p.add_argument("--num-fewshot", type=int_at_least(0), help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="task batch size (default: 1)")
    p.add_argument("--seqlen", type=int_at_least(2), default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=int_at_least(1), help="only the first N windows (default: all)")
    p.add_argument(
        "--data-dir", help="folder laid out like shared/data (default: $LITTLEBIT_DATA, ./shared/data)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", help="where to run (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute precision (default: float32)")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    p.add_argument("--baseline", choices=("svd", "onebit"), help="evaluate a baseline instead of the model")
    p.add_argument("--bpw", type=bpw_type, help="bit budget of --baseline svd (default: 1.0)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def run(args: argparse.Namespace) -> int:
    from littlebit.evaluation.perplexity import evaluate_perplexity, read_test_sets
    from littlebit.hf.checkpoint import load_compressed
    from littlebit.hf.models import load_model, load_tokenizer, resolve

    task_names = _split(args.tasks)
    if args.tasks is not None and not task_names:
        raise LittleBitError("--tasks names no task")
    if args.ppl is not None and not _split(args.ppl):
        raise LittleBitError("--ppl names no test set")
    ppl = args.ppl if args.ppl is not None else (None if task_names else "wikitext2")
    names = _split(ppl)
    if args.bpw is not None and args.baseline != "svd":
        raise LittleBitError("--bpw sets the budget of --baseline svd: add --baseline svd or drop --bpw")
    if not task_names and (args.limit is not None or args.num_fewshot is not None or args.batch_size != 1):
        raise LittleBitError("--limit, --num-fewshot and --batch-size go with --tasks")
    if args.baseline and is_littlebit_dir(args.model):
        raise LittleBitError(f"{args.model} is compressed already: --baseline needs the original model")
    for n in names:
        check_test_set(n)
    resolve(args.model)  # a model path that is not there fails before the slower checks below
    if names:
        check_context(args.model, args.seqlen, f"--seqlen {args.seqlen}")
    if task_names:
        from littlebit.evaluation.tasks import import_lm_eval, load_tasks

        # before the model loads: a missing extra, an unknown task or missing data fails at once
        import_lm_eval()
        tasks = load_tasks(task_names, args.data_dir)
    # before the model loads: a missing file or an unreachable dataset fails at once
    texts = read_test_sets(names, args.seqlen, args.max_windows, args.data_dir)
    device, dtype = device_name(args.device), torch_dtype(args.dtype)
    if is_littlebit_dir(args.model):
        model = load_compressed(
            args.model, device=device, dtype=dtype, allow_unverified=args.allow_unverified
        )
    else:
        model = load_model(args.model, dtype, device, args.trust_remote_code)
    if names:  # a GGUF file or a hub model: its context is known once loaded
        check_context(model, args.seqlen, f"--seqlen {args.seqlen}")
    if args.baseline:
        from littlebit.core.baselines import apply_baseline

        apply_baseline(model, args.baseline, args.bpw or 1.0)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    results = {}
    if names:
        results = evaluate_perplexity(
            model, tokenizer, names, args.seqlen, args.max_windows, args.data_dir, not args.json, texts
        )
    scores = {}
    if task_names:
        from littlebit.evaluation.tasks import evaluate_tasks

        scores = evaluate_tasks(
            model, tokenizer, task_names, args.limit, args.num_fewshot, args.batch_size, args.data_dir, tasks
        )
    perplexities = {name: r["perplexity"] for name, r in results.items()}
    if args.json:
        # Without --tasks the object stays {dataset: perplexity}, as scripts already read it.
        print(json.dumps({"tasks": scores, "perplexity": perplexities} if task_names else perplexities))
        return 0
    if scores:
        _print_scores(scores)
    for name, r in results.items():
        part = "" if r["windows_in_split"] in (None, r["windows"]) else f" of {r['windows_in_split']}"
        label = f"{name} {r['split']}" if r["split"] else name
        print(
            f"{label}: perplexity {r['perplexity']:,.2f} over {r['windows']}{part} windows of "
            f"{r['seqlen']} tokens"
        )
    return 0


def _split(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _print_scores(scores: dict[str, dict]) -> None:
    print(f"{'task':<16} {'metric':<12} {'value':>8} {'stderr':>8} {'examples':>8}")
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "samples" or value is None:
                continue
            err = metrics.get(f"{metric}_stderr")
            shown = f"{err:8.4f}" if err is not None else f"{'':>8}"
            print(f"{task:<16} {metric:<12} {value:8.4f} {shown} {metrics.get('samples') or '':>8}")
