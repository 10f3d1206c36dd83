"""``littlebit generate``: text from a LittleBit directory, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from littlebit.cli.common import UNVERIFIED_HELP, check_context, device_name, int_at_least
from littlebit.config import LittleBitError, first_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a LittleBit directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="(default: 64)")
    p.add_argument("--device", help="where to run (default: cuda when available)")
    p.add_argument("--latent-kv", action="store_true", help="cache the k/v latents instead of K and V")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from littlebit.hf.checkpoint import load_compressed, require_littlebit
    from littlebit.hf.verification import unverified_loading, verify_config_file

    if not args.prompt.strip():
        raise LittleBitError("the prompt is empty: give --prompt some text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
        raise LittleBitError("the prompt is not valid UTF-8 text") from None
    device = device_name(args.device)
    require_littlebit(args.dir)
    # The tokenizer is read before the model loads, to count the prompt's tokens: its files are
    # checked against their digests first, as the load checks them.
    with unverified_loading(args.allow_unverified):
        verify_config_file(Path(args.dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.dir)
    except Exception as e:  # a damaged tokenizer fails in many ways
        raise LittleBitError(f"{args.dir} has no usable tokenizer: {first_line(e)}") from e
    inputs = tokenizer(args.prompt, return_tensors="pt")
    n_prompt = inputs.input_ids.shape[1]
    if n_prompt == 0:
        raise LittleBitError("the prompt makes no tokens: give --prompt some text to continue")
    what = f"a {n_prompt}-token prompt plus --max-new-tokens {args.max_new_tokens}"
    check_context(args.dir, n_prompt + args.max_new_tokens, what)
    model = load_compressed(args.dir, device=device, allow_unverified=args.allow_unverified)
    inputs = inputs.to(device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    cache = None
    if args.latent_kv:
        from littlebit.runtime.kvcache import LatentKVCache, cache_argument

        cache = LatentKVCache.for_model(model)
        kwargs[cache_argument(model)] = cache
    if not args.json:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=False)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    if args.json:
        n_new = out.shape[1] - inputs.input_ids.shape[1]
        record = {"text": tokenizer.decode(out[0], skip_special_tokens=True), "new_tokens": int(n_new)}
        if cache is not None:
            record.update(cache.bytes_per_token_report())
        print(json.dumps(record))
    elif cache is not None:
        r = cache.bytes_per_token_report()
        print(
            f"\nlatent KV cache: {r['cache_bytes_per_token']:,.0f} bytes/token vs "
            f"{r['cache_bytes_per_token_standard']:,.0f} standard ({r['cache_compression']:.1f}x smaller)",
            file=sys.stderr,
        )
    return 0
