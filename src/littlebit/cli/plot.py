"""``littlebit plot``: training curves from JSONL training logs, perplexity against bits per weight
from benchmark result files, or held-out quality against training tokens from QAT result files, as
one PNG."""

from __future__ import annotations

import argparse

from littlebit.config import LittleBitError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="training logs (train_log.jsonl) or benchmark results (qat.json)",
    )
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument(
        "--kind",
        choices=("auto", "training", "quality", "compute"),
        default="auto",
        help="training curves, quality against BPW, or held-out quality against training tokens "
        "(compute; never chosen by auto) (default: training or quality, from what the files are)",
    )
    p.add_argument(
        "--variants",
        metavar="NAME,...",
        help="compute: only the runs of these recipe variants, each drawn by its BPW, layout and attention "
        "share alone (for variants that restate one recipe's settings)",
    )


def run(args: argparse.Namespace) -> int:
    from littlebit.evaluation.plots import plot_files

    if args.variants is not None and args.kind != "compute":
        raise LittleBitError("--variants goes with --kind compute")
    variants = None
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants:
            raise LittleBitError("--variants names no variant")
    print(plot_files(args.files, args.out, args.kind, variants))
    return 0
