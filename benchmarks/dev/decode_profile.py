"""Where a recorded decoding step of the teacher's text goes: ``generate-data``'s loop
(``littlebit.training.batch_decoding``) on a random model of the default model's shape (SmolLM2-135M:
30 layers, width 576, 3 key/value heads, 49,152-entry vocabulary), no download needed.

For each ``--variants`` entry and ``--batches`` size the step is recorded as a CUDA graph, advanced to
cache position ``--position``, and ``--reps`` replays are timed (median ms a step, tokens/s). Variants:
``fp32`` (the model's weights as loaded), ``tf32`` (the same with TF32 matrix products), ``bf16`` (the
model cast to bf16). Then one variant's replays run under ``torch.profiler`` and the kernels are listed
by GPU time, and ``sample_nucleus`` alone is timed on the step's logits. Prints tables and writes
``benchmarks/results/<--name>.json``.

    python benchmarks/dev/decode_profile.py                 # GPU: about a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from block_stage_speed import default_shape  # noqa: E402  (this folder: the default model's shape)

from littlebit.runtime.step_graph import GraphedMicroStep  # noqa: E402
from littlebit.training import batch_decoding  # noqa: E402
from littlebit.training.sampling import sample_nucleus  # noqa: E402


def build(dtype: torch.dtype):
    return default_shape(30).to("cuda", dtype)


def replays(model, batch: int, position: int, reps: int, profile: bool = False):
    """Median ms of a recorded step at cache ``position``; with ``profile``, the profiler's kernel table."""
    ids = torch.full((batch, 1), 1, device="cuda")
    mask = torch.ones_like(ids)
    total = position + reps + 8
    with torch.no_grad(), batch_decoding._grouped_attention(model):
        decoder = batch_decoding._Decoder(model, ids, mask, total, 1.0, 0.95, None)
        step = GraphedMicroStep(decoder.step, what="decoding step")
        tick = torch.zeros(1, device="cuda")
        for _ in range(position - 1):
            step(tick)
        assert step.active, "the step was not recorded"
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(reps):
                    step(tick)
                torch.cuda.synchronize()
            return kernels(p, reps)
        times = []
        for _ in range(reps):
            t0 = common.clock()
            step(tick)
            times.append(1e3 * (common.clock() - t0))
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    return statistics.median(times), logits


def kernels(p, reps: int) -> list[dict]:
    table: dict[str, list[float]] = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = table.setdefault(e.name[:90], [0.0, 0])
            t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            t[1] += 1
    rows = [
        {"kernel": k, "us_per_step": round(v[0] / reps, 1), "calls_per_step": round(v[1] / reps, 1)}
        for k, v in table.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="fp32,tf32,bf16")
    ap.add_argument("--batches", default="256,512,1024")
    ap.add_argument("--position", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", default="fp32", help="the variant profiled at the first batch size")
    ap.add_argument("--name", default="decode_profile")
    args = ap.parse_args()
    records, profiled, sampler = [], [], {}
    batches = [int(b) for b in args.batches.split(",")]
    for variant in args.variants.split(","):
        torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
        torch.backends.cudnn.allow_tf32 = variant == "tf32"
        model = build(torch.bfloat16 if variant == "bf16" else torch.float32)
        for batch in batches:
            ms, logits = replays(model, batch, args.position, args.reps)
            rec = {
                "variant": variant,
                "batch": batch,
                "position": args.position,
                "ms_per_step": round(ms, 2),
                "tokens_per_s": round(batch / ms * 1e3),
            }
            records.append(rec)
            print(rec, flush=True)
            if variant == args.profile and batch == batches[0]:
                profiled = replays(model, batch, args.position, 10, profile=True)
                print(f"{'kernel':90s} {'us/step':>9s} {'calls':>6s}")
                for r in profiled[:25]:
                    print(f"{r['kernel']:90s} {r['us_per_step']:9.1f} {r['calls_per_step']:6.1f}")
                print("sum of kernel time per step, us:", round(sum(r["us_per_step"] for r in profiled), 1))
                for method in ("sort", "buckets"):
                    fn = lambda m=method, x=logits: sample_nucleus(x, 1.0, 0.95, m)  # noqa: E731
                    for _ in range(3):
                        fn()
                    times = []
                    for _ in range(10):
                        t0 = common.clock()
                        fn()
                        times.append(1e3 * (common.clock() - t0))
                    sampler[method] = round(statistics.median(times), 3)
                print("sample_nucleus ms (eager):", sampler, flush=True)
        del model
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    common.write_results(
        args.name,
        records,
        kernels=profiled[:40],
        sample_nucleus_ms=sampler,
        profiled=args.profile,
        shape="SmolLM2-135M, random weights",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
