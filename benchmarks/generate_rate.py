"""How fast the default model writes its own training text here (``littlebit generate-data``).

Samples ``--shards`` shards into a fresh cache with the default settings (on a GPU as many sequences a
shard as 16 GiB of static cache holds, on a CPU 32) and records each shard's tokens and seconds.
Shards rotate through the start kinds (BOS, a random first token, the chat template, whose answer
pass doubles the length), so three shards cover each once. On a GPU the shards are sampled once per
``--dtypes`` entry (the teacher's dtype while it samples, each with its default batch), into fresh
caches, each decoding step replayed as a recorded CUDA graph; ``--eager`` adds eagerly launched steps
in the first dtype. Writes ``benchmarks/results/generate_rate_<device>.json``.

    python benchmarks/generate_rate.py --shards 3 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common
import torch

from littlebit.hf.models import load_model, load_tokenizer
from littlebit.training.config import TextGenConfig
from littlebit.training.teacher_text import TextCache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--dtypes", default="bfloat16,float32", help="sampling dtypes compared on a GPU")
    p.add_argument("--eager", action="store_true", help="also the first dtype with eager steps (GPU)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(None, device=device)
    tok = load_tokenizer(None)
    records, batches = [], {}
    dtypes = args.dtypes.split(",") if device == "cuda" else [None]
    cases = [(d, True) for d in dtypes] if device == "cuda" else [(None, False)]
    if device == "cuda" and args.eager:
        cases.append((dtypes[0], False))
    for dtype, recorded in cases:
        with tempfile.TemporaryDirectory() as tmp:
            cache = TextCache(model, tok, TextGenConfig(dtype=dtype), tmp, record_steps=recorded)
            steps = f"{cache.config.dtype}, {'recorded' if recorded else 'eager'}"
            for k in range(args.shards):
                t0 = time.perf_counter()
                cache.ensure(cache.tokens_available() + 1, limit=1)
                seconds = time.perf_counter() - t0
                tokens = cache.shard_tokens(k)
                records.append(
                    {
                        "steps": steps,
                        "batch_size": cache.config.batch_size,
                        "shard": k,
                        "start": cache.kinds[k % len(cache.kinds)],
                        "tokens": tokens,
                        "seconds": round(seconds, 1),
                        "tokens_per_s": round(tokens / seconds, 1),
                    }
                )
                print(records[-1], flush=True)
            batches[steps] = cache.config.batch_size
    rates = {}
    for steps in dict.fromkeys(r["steps"] for r in records):
        mine = [r for r in records if r["steps"] == steps]
        rates[steps] = round(sum(r["tokens"] for r in mine) / sum(r["seconds"] for r in mine), 1)
        print(f"{steps}: {rates[steps]:.1f} tokens/s over {len(mine)} shards of {batches[steps]} sequences")
    common.write_results(
        f"generate_rate_{device}",
        records,
        tokens_per_s=rates,
        batch_sizes=batches,
        threads=torch.get_num_threads(),
        model="SmolLM2-135M-Instruct",
    )


if __name__ == "__main__":
    main()
