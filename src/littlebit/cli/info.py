"""``littlebit info``: bits, ranks and sizes of a LittleBit directory, the summary first."""

from __future__ import annotations

import argparse
import json
import re

from littlebit.cli.common import UNVERIFIED_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a LittleBit directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-load", action="store_true", help="do not load the model to measure its memory")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)


def _natural(name: str) -> list:
    """``layers.2`` before ``layers.19``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run(args: argparse.Namespace) -> int:
    from littlebit.hf.report import checkpoint_info

    info = checkpoint_info(args.dir, measure_memory=not args.no_load, allow_unverified=args.allow_unverified)
    info["layers"] = sorted(info["layers"], key=lambda layer: _natural(layer["name"]))
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"BPW: {info['bpw_linear']:.4f} over the compressed layers, {info['bpw_total']:.4f} over all weights"
    )
    print(f"parameters: {info['n_params']:,}   as FP16: {info['fp16_bytes']:,} bytes")
    print(f"on disk: {info['bytes_on_disk']:,} bytes (expected from the ranks: {info['bytes_expected']:,})")
    if "bytes_in_memory" in info:
        print(f"in memory: {info['bytes_in_memory']:,} bytes")
    print(f"\n{len(info['layers'])} compressed layers:")
    print(f"{'layer':<48} {'shape':>12} {'rank':>5} {'bpw':>7} {'bytes':>10}")
    for layer in info["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        print(f"{layer['name']:<48} {shape:>12} {layer['rank']:>5} {layer['bpw']:>7.4f} {layer['bytes']:>10}")
    return 0
