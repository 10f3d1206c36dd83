"""``littlebit plot``: training curves from JSONL training logs, or perplexity against bits per weight
from benchmark result files, as one PNG."""

from __future__ import annotations

import argparse


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
        choices=("auto", "training", "quality"),
        default="auto",
        help="training curves or quality against BPW (default: from what the files are)",
    )


def run(args: argparse.Namespace) -> int:
    from littlebit.evaluation.plots import plot_files

    print(plot_files(args.files, args.out, args.kind))
    return 0
