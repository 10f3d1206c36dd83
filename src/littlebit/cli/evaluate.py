"""``littlebit eval``: perplexity of the default model, any Hugging Face model or a LittleBit directory."""

from __future__ import annotations

import argparse
import json

from littlebit.cli.common import (
    DEFAULT_MODEL_HELP,
    DTYPES,
    UNVERIFIED_HELP,
    bpw_type,
    device_name,
    int_at_least,
    is_littlebit_dir,
    torch_dtype,
)
from littlebit.config import LittleBitError
from littlebit.evaluation.data import DATASETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help=f"a LittleBit directory, or {DEFAULT_MODEL_HELP}")
    p.add_argument(
        "--ppl",
        default="wikitext2",
        help=f"comma-separated test sets: {','.join(DATASETS)} (default: wikitext2)",
    )
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
    from littlebit.evaluation.perplexity import evaluate_perplexity
    from littlebit.hf.checkpoint import load_compressed
    from littlebit.hf.models import load_model, load_tokenizer

    names = [n.strip() for n in args.ppl.split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            raise LittleBitError(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    device, dtype = device_name(args.device), torch_dtype(args.dtype)
    if is_littlebit_dir(args.model):
        model = load_compressed(
            args.model, device=device, dtype=dtype, allow_unverified=args.allow_unverified
        )
    else:
        model = load_model(args.model, dtype, device, args.trust_remote_code)
        if args.baseline:
            from littlebit.core.baselines import apply_baseline

            apply_baseline(model, args.baseline, args.bpw or 1.0)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    results = evaluate_perplexity(
        model, tokenizer, names, args.seqlen, args.max_windows, args.data_dir, progress=not args.json
    )
    if args.json:
        print(json.dumps({name: r["perplexity"] for name, r in results.items()}))
        return 0
    for name, r in results.items():
        part = "" if r["windows"] == r["windows_in_split"] else f" of {r['windows_in_split']}"
        print(
            f"{name} test: perplexity {r['perplexity']:,.2f} over {r['windows']}{part} windows of "
            f"{r['seqlen']} tokens"
        )
    return 0
