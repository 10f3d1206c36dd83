"""Decoding step of the default model: transformers' sampler, littlebit's nucleus sampler, and
littlebit's own decoding loop.

All draw top-p 0.95, temperature 1 samples for a batch of ``--batch`` sequences from BOS, ``--steps``
new tokens each (no early end): transformers' ``generate`` with ``do_sample=True`` (it sorts every row
of logits and draws with ``torch.multinomial``); ``generate``'s greedy search over
``littlebit.training.sampling``'s ``NucleusSampler``; and ``littlebit.training.batch_decoding``'s
loop with a static cache and the same sampler (what ``littlebit generate-data`` runs; on a GPU each
step a replayed CUDA graph), and the same loop on transformers' own sdpa attention instead of its
grouped single-token attention (``littlebit-loop-transformers-sdpa``: on transformers 5.17 a masked
step copies the cache once per query head; ``--steps 448`` shows the cost growing with the cache).
``--routes`` picks some of them. Repetitions alternate in one process; medians. Also times
``nucleus_floor`` alone, by sort and by buckets, on random logits of the vocabulary's size. Writes
``benchmarks/results/sampling_speed_<device>[_<steps>steps].json``.

    python benchmarks/sampling_speed.py
    python benchmarks/sampling_speed.py --batch 256 --steps 448 \
        --routes littlebit-loop,littlebit-loop-transformers-sdpa
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import common
import torch
import transformers
from transformers import GenerationConfig, LogitsProcessorList

from littlebit.hf.models import load_model, load_tokenizer
from littlebit.training import batch_decoding
from littlebit.training.batch_decoding import sample_batch
from littlebit.training.sampling import NucleusSampler, nucleus_floor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--routes", default=None, help="comma-separated, of those in the results (default: all)")
    p.add_argument("--name", default=None, help="results file (sampling_speed_<device>[_<steps>steps])")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(None, device=device)
    tok = load_tokenizer(None)
    ids = torch.full((args.batch, 1), tok.bos_token_id, device=device)
    common_kw = dict(max_new_tokens=args.steps, min_new_tokens=args.steps, pad_token_id=tok.eos_token_id)
    mask = torch.ones_like(ids)

    def generate(cfg: GenerationConfig, **kw):
        return lambda: model.generate(ids, attention_mask=mask, generation_config=cfg, **kw)

    runs = {
        "transformers": generate(
            GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, **common_kw)
        ),
        "littlebit": generate(
            GenerationConfig(do_sample=False, **common_kw),
            logits_processor=LogitsProcessorList([NucleusSampler(1.0, 0.95)]),
        ),
        "littlebit-loop": lambda: sample_batch(model, ids, mask, 1 + args.steps, 1.0, 0.95, eos=None),
        "littlebit-loop-transformers-sdpa": transformers_attention(
            lambda: sample_batch(model, ids, mask, 1 + args.steps, 1.0, 0.95, eos=None)
        ),
    }
    if args.routes:
        unknown = set(args.routes.split(",")) - set(runs)
        if unknown:
            p.error(f"unknown routes {sorted(unknown)}; known: {sorted(runs)}")
        runs = {name: run for name, run in runs.items() if name in args.routes.split(",")}
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            torch.manual_seed(0)
            with torch.no_grad():
                t0 = common.clock()
                run()
                ms[name].append(1e3 * (common.clock() - t0) / args.steps)
    step = {name: round(statistics.median(v), 1) for name, v in ms.items()}
    ratios = {}
    if "littlebit" in step:
        ratios["littlebit_vs_transformers"] = step.get("transformers", 0) / step["littlebit"]
    if "littlebit-loop" in step:
        loop = step["littlebit-loop"]
        ratios["loop_vs_littlebit"] = step.get("littlebit", 0) / loop
        ratios["grouped_vs_transformers_sdpa"] = step.get("littlebit-loop-transformers-sdpa", 0) / loop
    ratios = {k: round(v, 2) for k, v in ratios.items() if v}
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    probs = torch.softmax(torch.randn(args.batch, vocab, generator=gen) * 3, -1).to(device)
    floor_ms = {}
    for method in ("sort", "buckets"):
        times = []
        for _ in range(5):
            t0 = common.clock()
            nucleus_floor(probs, 0.95, method)
            times.append(1e3 * (common.clock() - t0))
        floor_ms[method] = round(statistics.median(times), 2)
    print(f"ms per step (batch {args.batch}, {args.steps} steps): {step}; speed-ups {ratios}")
    print(f"nucleus_floor ms, {args.batch} x {vocab}: {floor_ms}")
    common.write_results(
        args.name or f"sampling_speed_{device}" + ("" if args.steps == 64 else f"_{args.steps}steps"),
        [{"sampler": n, "ms_per_step": step[n], "runs_ms": [round(x, 1) for x in ms[n]]} for n in ms],
        batch=args.batch,
        steps=args.steps,
        threads=torch.get_num_threads(),
        speedups=ratios,
        tokens_per_s={n: round(args.batch * 1e3 / step[n], 1) for n in step},
        nucleus_floor_ms=floor_ms,
        model="SmolLM2-135M-Instruct",
        transformers=transformers.__version__,
    )


def transformers_attention(run):
    """``run`` with the loop left on the model's own attention implementation."""

    def wrapped():
        with mock.patch.object(batch_decoding, "_grouped_attention", contextlib.nullcontext):
            return run()

    return wrapped


if __name__ == "__main__":
    main()
