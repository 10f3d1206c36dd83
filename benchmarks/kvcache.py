"""Latent KV cache vs the standard cache on a Llama-2-7B-shaped packed model.

For each BPW and context length: prefill a random prompt into a ``DynamicCache`` and into a
``LatentKVCache``, measure the bytes each cache holds (from its tensors), then time greedy decoding
(a plain forward loop, batch 1; the median step). Where the time goes, two ways:

* components timed apart on the same cache, summed over layers: the rebuild of K (with RoPE) and V
  from the latents, scaled dot-product attention over the context, and the concatenation that a
  ``DynamicCache`` does to append each token;
* the GPU time of a few decoding steps under ``torch.profiler``, by kernel family (LittleBit Triton
  projections, attention, cuBLAS GEMMs, the rest); wall time minus GPU time is launch overhead.

Exactness (per BPW, first context): layer 0's K against an fp32 computation, for both caches, and the
first step's logits. The random-weight model amplifies rounding a lot, so logits are compared with
the fp16-vs-fp32 gap of the standard cache itself.
Prints a table, writes benchmarks/results/kvcache.json.

    python benchmarks/kvcache.py [--bpw 0.1,0.55] [--contexts 1024,4096,8192,16384,32768]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import common
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from littlebit.op import available_backends, register_backend, use_backend
from littlebit.runtime.kvcache import LatentKVCache
from littlebit.runtime.packed import PackedLittleBitLinear
from littlebit.runtime.synthetic import random_packed_llama

CUDA = torch.cuda.is_available()


def use_triton() -> str:
    """Register the Triton backend when it runs and agrees with the reference, else use the reference."""
    if not CUDA:
        return "reference"
    try:
        if "triton" not in available_backends():
            from littlebit.kernels.gpu import triton_littlebit as tk

            register_backend("triton", "cuda", tk.littlebit_linear_triton, tk.accepts)
        layer = PackedLittleBitLinear(4096, 1024, 80, device="cuda")
        layer.u_signs.random_(-(2**31), 2**31 - 1)
        layer.v_signs.random_(-(2**31), 2**31 - 1)
        layer.l.fill_(1 / 4096**0.5)
        x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.float16)
        with use_backend("triton"):
            fast = layer(x).float()
        with use_backend("reference"):
            ref = layer(x).float()
        err, scale = (fast - ref).abs().max().item(), ref.abs().max().item()
        if err > 1e-2 * scale:  # fp16 rounding of outputs this size is ~1e-3 of the scale
            raise RuntimeError(f"disagrees with the reference by {err:.3g} (outputs up to {scale:.3g})")
    except Exception as e:  # the kernels are optional here: report what ran
        print(f"triton backend not used ({type(e).__name__}: {e}); using the reference op")
        os.environ["LITTLEBIT_BACKEND"] = "reference"
        return "reference"
    return "triton"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cache_bytes(cache) -> int:
    if isinstance(cache, LatentKVCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def new_cache(model, kind: str):
    if kind == "standard":
        return DynamicCache()
    return LatentKVCache.for_model(model, keep_factors=kind == "latent")


def step(model, cache, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
    return logits, logits.argmax(-1, keepdim=True)


def kernel_family(name: str) -> str:
    n = name.lower()
    if "gemv_" in n or "_tc_" in n or "prep_kernel" in n:
        return "littlebit"
    if any(s in n for s in ("flash", "fmha", "attention", "efficient")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "cutlass", "xmma", "sm90_")):
        return "gemm"
    return "other"


def gpu_breakdown(model, cache, tok: torch.Tensor, steps: int = 3) -> dict:
    """GPU milliseconds per decoding step by kernel family (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _, tok = step(model, cache, tok)
        sync()
    out = {"littlebit": 0.0, "attention": 0.0, "gemm": 0.0, "other": 0.0}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            out[kernel_family(evt.name)] += evt.time_range.elapsed_us() / 1e3 / steps
    out["total"] = sum(out.values())
    return out


@torch.no_grad()
def run_cache(model, kind: str, ids: torch.Tensor, steps: int) -> tuple[dict, object]:
    cache = new_cache(model, kind)
    sync()
    t0 = time.perf_counter()
    tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    sync()
    rec = {"cache_bytes": cache_bytes(cache), "prefill_s": time.perf_counter() - t0}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 3):  # three warm-up steps (kernel compilation, allocator)
        t0 = time.perf_counter()
        _, tok = step(model, cache, tok)
        int(tok)  # a real decoder needs the token on the host before the next step
        if i >= 3:
            times.append(time.perf_counter() - t0)
    rec["step_ms"] = sorted(times)[len(times) // 2] * 1e3
    rec["tokens_per_s"] = 1e3 / rec["step_ms"]
    rec["workspace_bytes"] = cache.workspace_bytes() if isinstance(cache, LatentKVCache) else 0
    if CUDA:
        rec["decode_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        try:
            rec["gpu_ms"] = gpu_breakdown(model, cache, tok)
        except Exception as e:  # the profiler is a diagnostic: never lose the run to it
            rec["gpu_ms"] = {"error": f"{type(e).__name__}: {e}"}
    return rec, cache


@torch.no_grad()
def components(model, cache: LatentKVCache, reps: int) -> dict:
    """Per-step costs at the cache's length, summed over layers: rebuild, attention, standard append."""
    cfg, n = model.config, cache.get_seq_length()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim, dev, dtype = cfg.hidden_size // heads, model.device, model.dtype
    rope = cache._rope(n, 0, None, torch.empty(0, dtype=dtype, device=dev))
    k_out = torch.empty(1, kv_heads, n, dim, dtype=dtype, device=dev)
    v_out = torch.empty_like(k_out)
    q = torch.randn(1, heads, 1, dim, dtype=dtype, device=dev)
    new = torch.randn(1, kv_heads, 1, dim, dtype=dtype, device=dev)

    def rebuild():
        for layer in cache.layers:
            layer.k.rebuild_into(k_out, rope)
            layer.v.rebuild_into(v_out, None)

    def attention():
        for _ in cache.layers:
            F.scaled_dot_product_attention(q, k_out, v_out, enable_gqa=heads != kv_heads)

    def append():
        for _ in cache.layers:
            torch.cat([k_out, new], dim=-2)
            torch.cat([v_out, new], dim=-2)

    return {
        "rebuild_ms": timed(rebuild, reps) * 1e3,
        "attention_ms": timed(attention, reps) * 1e3,
        "standard_append_ms": timed(append, reps) * 1e3,
    }


@torch.no_grad()
def exactness(model, ids: torch.Tensor) -> dict:
    """Layer-0 K and first-step logits of both caches in fp16, against the same in fp32."""
    got = {}
    for dtype in (torch.float16, torch.float32):  # fp32 last: the model is not cast back
        if dtype != model.dtype:  # (casting to fp16 would also round the fp32 RoPE frequencies)
            torch.nn.Module.to(model, dtype)
        for kind in ("standard", "latent"):
            cache = new_cache(model, kind)
            tok = (
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            )
            keys = cache.layers[0].states()[0] if kind == "latent" else cache.layers[0].keys
            got[kind, dtype] = (keys.float(), step(model, cache, tok)[0].float())
            del cache
    truth_k, truth_logits = got["standard", torch.float32]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {
        "k0_relerr_standard_fp16": rel(got["standard", torch.float16][0], truth_k),
        "k0_relerr_latent_fp16": rel(got["latent", torch.float16][0], truth_k),
        "k0_relerr_latent_fp32": rel(got["latent", torch.float32][0], truth_k),
        "logit_maxdiff_standard_fp16_vs_fp32": (got["standard", torch.float16][1] - truth_logits)
        .abs()
        .max()
        .item(),
        "logit_maxdiff_latent_vs_standard_fp16": (
            (got["latent", torch.float16][1] - got["standard", torch.float16][1]).abs().max().item()
        ),
        "logit_maxdiff_latent_vs_standard_fp32": (got["latent", torch.float32][1] - truth_logits)
        .abs()
        .max()
        .item(),
        "logit_std": truth_logits.std().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--bpw", default="0.1,0.55")
    p.add_argument("--contexts", default="1024,4096,8192,16384,32768")
    p.add_argument("--steps", type=int, default=16, help="timed decoding steps per point")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, help="fewer decoder layers (quick checks)")
    p.add_argument("--budget-s", type=float, default=360, help="skip the remaining points past this time")
    args = p.parse_args()
    start = time.perf_counter()
    device = "cuda" if CUDA else "cpu"
    backend = use_triton()
    extra = {"num_hidden_layers": args.layers} if args.layers else {}
    contexts = [int(c) for c in args.contexts.split(",")]
    records, checks, skipped = [], [], []
    for bpw in [float(b) for b in args.bpw.split(",")]:
        model = random_packed_llama(args.shape, bpw, device, torch.float16, **extra)
        k_proj = model.model.layers[0].self_attn.k_proj
        gen = torch.Generator().manual_seed(0)
        for n in contexts:
            if time.perf_counter() - start > args.budget_s:
                skipped.append({"bpw": bpw, "context": n})
                continue
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device)
            rec = {"bpw": bpw, "context": n, "rank": k_proj.rank, "paths": k_proj.n_paths}
            kinds = ["standard", "latent"] + (["latent_lean"] if n == contexts[-1] else [])
            for kind in kinds:
                res, cache = run_cache(model, kind, ids, args.steps)
                rec.update({f"{kind}_{k}": v for k, v in res.items()})
                if kind == "latent":
                    rec.update(components(model, cache, args.reps))
                del cache
                gc.collect()
                if CUDA:
                    torch.cuda.empty_cache()
            # The cache's shape does not depend on the weights: the FP16 model holds the standard one.
            rec["fp16_cache_bytes"] = rec["standard_cache_bytes"]
            rec["ratio_vs_fp16"] = rec["fp16_cache_bytes"] / rec["latent_cache_bytes"]
            records.append(rec)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
        ids = torch.randint(0, model.config.vocab_size, (1, contexts[0]), generator=gen).to(device)
        checks.append({"bpw": bpw, "context": contexts[0], **exactness(model, ids)})
        print(checks[-1], flush=True)
        del model
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    path = common.write_results(
        "kvcache",
        records,
        shape=args.shape,
        backend=backend,
        steps=args.steps,
        exactness=checks,
        skipped=skipped,
    )
    report(records, checks, backend)
    if skipped:
        print(f"skipped (time budget): {skipped}")
    print(f"wrote {path} in {time.perf_counter() - start:.0f}s")


def report(records: list[dict], checks: list[dict], backend: str) -> None:
    print(f"\nmachine: {common.device_name()}, torch {torch.__version__}, backend {backend}")
    print(
        f"{'bpw':>5} {'ctx':>6} {'std GB':>7} {'lat GB':>7} {'x FP16':>7} {'std tok/s':>9} {'lat tok/s':>9} "
        f"{'rebuild':>8} {'attn':>6} {'append':>7} {'GPU std':>8} {'GPU lat':>8}"
    )
    for r in records:
        gpu = [r.get(f"{k}_gpu_ms", {}).get("total", float("nan")) for k in ("standard", "latent")]
        print(
            f"{r['bpw']:>5} {r['context']:>6} {r['standard_cache_bytes'] / 1e9:>7.3f} "
            f"{r['latent_cache_bytes'] / 1e9:>7.3f} {r['ratio_vs_fp16']:>6.1f}x "
            f"{r['standard_tokens_per_s']:>9.1f} {r['latent_tokens_per_s']:>9.1f} {r['rebuild_ms']:>8.1f} "
            f"{r['attention_ms']:>6.1f} {r['standard_append_ms']:>7.1f} {gpu[0]:>8.1f} {gpu[1]:>8.1f}"
        )
    for c in checks:
        print({k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in c.items()})


if __name__ == "__main__":
    main()
