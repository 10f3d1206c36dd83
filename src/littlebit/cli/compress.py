"""``littlebit compress``: convert and initialise a model's linear layers, save it packed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from littlebit.cli.common import (
    DTYPES,
    add_compression_arguments,
    compression_config,
    device_name,
    torch_dtype,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_compression_arguments(p, init_default="dual-svid")
    p.add_argument(
        "--dtype", default="bfloat16", choices=DTYPES, help="precision of the uncompressed weights saved"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from littlebit.atomic import check_output_dir
    from littlebit.core.convert import convert
    from littlebit.hf.checkpoint import save_compressed
    from littlebit.hf.models import load_model, load_tokenizer

    config = compression_config(args)
    check_output_dir(Path(args.out))  # fail before the slow part if the output is unusable
    device = device_name(args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, torch.float32, device, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    t1 = time.perf_counter()
    report = convert(model, config, compute_device=device)
    t2 = time.perf_counter()
    save_compressed(model, args.out, tokenizer, config, dtype=torch_dtype(args.dtype))
    print(
        f"compressed {args.model or 'SmolLM2-135M-Instruct'}: {len(report.layers)} layers, "
        f"BPW {report.bpw_linear:.4f} (linear), {report.bpw_total:.4f} (all weights); "
        f"load {t1 - t0:.1f}s, compress {t2 - t1:.1f}s -> {args.out}"
    )
    return 0
