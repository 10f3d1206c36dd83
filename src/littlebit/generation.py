"""Text generation from a LittleBit directory, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import LittleBitError


def generate_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from .serialization import load_compressed

    if args.max_new_tokens < 1:
        raise LittleBitError("--max-new-tokens must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_compressed(args.dir, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.dir)
    except (OSError, ValueError) as e:
        raise LittleBitError(f"{args.dir} has no usable tokenizer: {str(e).splitlines()[0]}") from e
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    cache = None
    if args.latent_kv:
        from .kvcache import LatentKVCache, cache_argument

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
