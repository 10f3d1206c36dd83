"""``littlebit generate-data``: the teacher writes its own training text, cached as token shards.

Run again with the same settings to continue an interrupted generation, or with more ``--tokens``
to extend it; ``littlebit train --data generated --generated-dir DIR`` then reads the shards
instead of sampling them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from littlebit.atomic import check_writable_dir
from littlebit.cli.common import (
    DEFAULT_MODEL_HELP,
    SEED_MAX,
    check_context,
    device_name,
    int_at_least,
    threads_type,
)
from littlebit.config import LittleBitError
from littlebit.training.config import SAMPLING_DTYPES, START_KINDS, TextGenConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gen = TextGenConfig()
    parser.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    parser.add_argument("--tokens", type=int, required=True, help="generated tokens wanted in the cache")
    parser.add_argument(
        "--out",
        default=None,
        help="cache root; shards go to a folder keyed by model and settings below "
        "it (default: ~/.cache/littlebit/generated, or $LITTLEBIT_CACHE/generated)",
    )
    parser.add_argument(
        "--length", type=int, default=gen.length, help="tokens per sequence (the train seqlen)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per shard (GPU: as many as 16 GiB of cache holds; CPU: 32)",
    )
    parser.add_argument("--temperature", type=float, default=gen.temperature)
    parser.add_argument("--top-p", type=float, default=gen.top_p)
    parser.add_argument(
        "--starts", default=",".join(gen.starts), help=f"start kinds, some of {','.join(START_KINDS)}"
    )
    parser.add_argument(
        "--seed",
        type=int_at_least(0, SEED_MAX),
        default=0,
        help="the same as train's --seed to share its cache",
    )
    parser.add_argument(
        "--dtype",
        choices=SAMPLING_DTYPES,
        default=None,
        help="the teacher's dtype while it samples (default: GPU, bfloat16 for an fp32 model; else its own)",
    )
    parser.add_argument("--device", help="where to sample (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    parser.add_argument("--threads", type=threads_type, default=None, help="CPU threads (default: torch's)")


def gen_config(args: argparse.Namespace) -> TextGenConfig:
    if args.tokens < 1:
        raise LittleBitError(f"--tokens must be >= 1, got {args.tokens}")
    return TextGenConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        length=args.length,
        batch_size=args.batch_size,
        starts=[k.strip() for k in args.starts.split(",") if k.strip()],
        seed=args.seed,
        dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    """Generate the missing shards; prints the cache folder and its size as JSON."""
    import time

    import torch

    from littlebit.hf.models import load_model, load_tokenizer
    from littlebit.training.teacher_text import TextCache, default_cache_dir

    config = gen_config(args)
    # before the model loads
    check_writable_dir(Path(args.out) if args.out is not None else default_cache_dir())
    check_context(args.model, config.length, f"--length {config.length}")  # a local folder's config.json
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_name(args.device)
    model = load_model(args.model, device=device, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    cache = TextCache(model, tokenizer, config, args.out)
    shards_before, have = cache.available(), cache.tokens_available()
    print(f"{cache.dir}: {have:,} tokens in {shards_before} shards there", file=sys.stderr, flush=True)
    last = [have]

    def progress(there: int, wanted: int, seconds: float) -> None:
        rate = (there - last[0]) / seconds if seconds else float("nan")
        last[0] = there
        print(
            f"{there:,} of {wanted:,} tokens: shard in {seconds:.1f} s, {rate:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )

    t0 = time.perf_counter()
    done = cache.ensure(args.tokens, progress)
    seconds = time.perf_counter() - t0
    total = cache.tokens_available()
    made = total - have
    summary = {
        "dir": str(cache.dir),
        "shards": done,
        "tokens": total,
        "generated_tokens": made,
        "new_shards": done - shards_before,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(made / seconds, 1) if made else None,
        "generation": cache.settings["generation"],
    }
    print(json.dumps(summary))
    return 0
