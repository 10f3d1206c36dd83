"""Many tokens on the GPU: the prefill kernels per layer, time to first token, batched decoding.

- layers: each Llama-2-7B and -70B linear shape at 0.1/0.55/1.0 BPW (two paths, random signs) and
  128-8192 tokens, bf16: the packed product (``littlebit_linear_triton``; fp16 timed too), cuBLAS on the dense
  weight (``F.linear``), and the low-rank product with the factors unpacked to bf16 with the scales
  folded in (two cuBLAS GEMMs): µs (median, one CUDA graph of ~20 ms of calls), TFLOP/s of each one's own
  FLOPs, and the packed result's relative error (bf16 and fp16) against the fp32 product with the
  fp32 reconstruction W = B A of the same factors (computed as (x A^T) B^T, the same up to fp32 rounding);
- ttft: the whole Llama-2-7B shape (random weights, fp16; ``runtime.synthetic``), one forward of a
  prompt of 128/2048/8192 tokens keeping the last logits, eager, median of 5 (packed at 2048 also
  through the reference op, the path such calls took before the prefill kernels);
- serve: batched greedy decoding of that model, batch 64 and 256 after a 128-token prompt, each step
  one CUDA graph: tokens/s;
- sweep (in --quick): prefill tiles on three layers, and the prefill kernels against the 2-64-token
  tensor-core kernels around the 65-token threshold.

    python benchmarks/prefill.py --quick --out $OUT/prefill_quick.json      # about 5 minutes
    python benchmarks/prefill.py --out $OUT/prefill.json
    TRITON_INTERPRET=1 python benchmarks/prefill.py --smoke                 # CPU: tiny layers only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

LAYERS = {  # name: (d_in, d_out); the acceptance layer first, so a run cut short still has it
    "70b-up": (8192, 28672),
    "7b-qo": (4096, 4096),
    "7b-up": (4096, 11008),
    "7b-down": (11008, 4096),
    "70b-qo": (8192, 8192),
    "70b-kv": (8192, 1024),
    "70b-down": (28672, 8192),
}
SMOKE_LAYERS = {"smoke-a": (200, 72), "smoke-b": (100, 300)}


def random_layer(d_in: int, d_out: int, bpw: float, device: str, seed: int) -> list[torch.Tensor]:
    """(u, v, h, l, g) of a two-path layer at ``bpw`` with random signs, scales as
    ``runtime.synthetic`` draws them (fp16)."""
    from littlebit.core.budget import rank_for_bpw

    r = rank_for_bpw(d_in, d_out, bpw, True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, device=device, dtype=torch.int32)

    u, v = words(2, d_out, (r + 31) // 32), words(2, r, (d_in + 31) // 32)
    h = (torch.rand(2, d_out, generator=gen, device=device) * 0.5 + 0.75).half()
    g = (torch.rand(2, d_in, generator=gen, device=device) * 0.5 + 0.75).half()
    l = torch.full((2, r), 1.0 / d_in**0.5 / 8, device=device).half()
    return [u, v, h, l, g]


def factors(u, v, h, l, g) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 A (2r x d_in) and B (d_out x 2r) with y = x A^T B^T: the scales folded into the signs."""
    from littlebit.core.packing import unpack_signs

    d_in, r = g.shape[-1], l.shape[-1]
    a = [unpack_signs(v[p], d_in) * l[p].float()[:, None] * g[p].float()[None, :] for p in range(2)]
    b = [unpack_signs(u[p], r) * h[p].float()[:, None] for p in range(2)]
    return torch.cat(a), torch.cat(b, dim=1)


def gpu_us(fn, device: str) -> float:
    """Median µs of ``fn``: a CUDA graph of it replayed (no launch overhead); perf_counter off the GPU."""
    fn()
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    import triton.testing

    torch.cuda.synchronize()
    try:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception as e:  # a call that cannot be captured is timed with events, and says so
        print(f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing with events", flush=True)
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=20, return_mode="median")


def time_case(x, layer, w_dense, a16, b16, device: str) -> dict:
    from littlebit.kernels.gpu import triton_littlebit as tk
    from littlebit.kernels.gpu.route import kernel_family

    x16 = x.half()
    times = {
        "family": kernel_family(x.shape[0], tk.DEFAULT_CONFIG),
        "packed_us": gpu_us(lambda: tk.littlebit_linear_triton(x, *layer), device),
        "packed_fp16_us": gpu_us(lambda: tk.littlebit_linear_triton(x16, *layer), device),
        "dense_us": gpu_us(lambda: F.linear(x, w_dense), device),
        "lowrank_us": gpu_us(lambda: F.linear(F.linear(x, a16), b16), device),
    }
    if times["family"] == "gemm":  # the prefill kernels the GEMM path replaces there, side by side
        cfg = dataclasses.replace(tk.DEFAULT_CONFIG, gemm_min_tokens=1 << 30)
        kernels = gpu_us(lambda: tk.littlebit_linear_triton(x, *layer, config=cfg), device)
        times["prefill_kernels_us"] = kernels
    return times


def rel_err(x, layer, a32, b32) -> float:
    from littlebit.kernels.gpu import triton_littlebit as tk

    y = tk.littlebit_linear_triton(x, *layer)
    ref = (x.float() @ a32.T) @ b32.T
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_layers(args, device: str, save) -> list[dict]:
    layers = SMOKE_LAYERS if args.smoke else {k: LAYERS[k] for k in args.layers.split(",")}
    records = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, (d_in, d_out) in layers.items():
        w_dense = None
        for bpw in [float(b) for b in args.bpw.split(",")]:
            layer = random_layer(d_in, d_out, bpw, device, seed=d_in + d_out + int(100 * bpw))
            r = layer[3].shape[-1]
            a32, b32 = factors(*layer)
            w32 = b32 @ a32  # the dense reconstruction, fp32
            a16, b16 = a32.bfloat16(), b32.bfloat16()
            if w_dense is None:  # cuBLAS gets a dense weight of the layer's shape (values do not matter)
                w_dense = w32.bfloat16()
            del w32
            for m in [int(t) for t in args.tokens.split(",")]:
                x = torch.randn(m, d_in, device=device, generator=torch.Generator(device).manual_seed(m))
                x = x.bfloat16()
                rec = {"layer": name, "d_in": d_in, "d_out": d_out, "bpw": bpw, "rank": r, "tokens": m}
                try:
                    rec["rel_err"] = rel_err(x, layer, a32, b32)
                    rec["rel_err_fp16"] = rel_err(x.half(), layer, a32, b32)
                    rec.update(time_case(x, layer, w_dense, a16, b16, device))
                except Exception as e:  # recorded, and the rest still runs
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(rec, flush=True)
                    records.append(rec)
                    continue
                flops_lr, flops_dense = 2 * m * 2 * r * (d_in + d_out), 2 * m * d_in * d_out
                rec.update(
                    packed_tflops=flops_lr / rec["packed_us"] / 1e6,
                    dense_tflops=flops_dense / rec["dense_us"] / 1e6,
                    lowrank_tflops=flops_lr / rec["lowrank_us"] / 1e6,
                    speedup_vs_dense=rec["dense_us"] / rec["packed_us"],
                    speedup_vs_lowrank=rec["lowrank_us"] / rec["packed_us"],
                    flops_ratio=flops_dense / flops_lr,
                )
                records.append(rec)
                if "prefill_kernels_us" in rec:
                    rec["speedup_vs_prefill_kernels"] = rec["prefill_kernels_us"] / rec["packed_us"]
                print(
                    f"{name:<9} {bpw:>4} {m:>5}  {rec['family']:<8} packed {rec['packed_us']:>9.1f} µs "
                    f"(prefill kernels {rec.get('prefill_kernels_us', float('nan')):>9.1f}) "
                    f"(fp16 {rec['packed_fp16_us']:>9.1f}) "
                    f"({rec['packed_tflops']:>5.1f} TF/s)  dense {rec['dense_us']:>9.1f}  "
                    f"low-rank {rec['lowrank_us']:>9.1f}  x{rec['speedup_vs_dense']:.2f} vs dense  "
                    f"err {rec['rel_err']:.1e} / {rec['rel_err_fp16']:.1e}",
                    flush=True,
                )
                save()
            del a32, b32, a16, b16, layer
        del w_dense
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


SWEEP = [  # prefill tiles the sweep section tries: (tokens, stage-1 rows, stage-2 rows, words, warps, stages)
    (128, 64, 128, 2, 8, 3),
    (128, 128, 128, 2, 8, 3),
    (128, 64, 128, 4, 8, 3),
    (128, 64, 256, 2, 8, 3),
    (128, 64, 128, 2, 4, 3),
    (128, 64, 128, 2, 8, 4),
    (64, 64, 128, 2, 4, 3),
    # with the loops pipelined, deeper pipelines and longer steps may pay
    (128, 128, 128, 4, 8, 3),
    (128, 128, 128, 2, 8, 4),
    (64, 64, 128, 4, 4, 4),
    (64, 128, 128, 2, 4, 4),
    (256, 64, 128, 2, 8, 3),
    (64, 64, 64, 2, 4, 3),
    (64, 64, 64, 2, 4, 4),
]
# the acceptance layer's prompt, the 7B up projection's prompt at both ends of the BPW range, a short
# prompt, and batch-256 and batch-64 decoding at 0.55 BPW (below FP16 on the GEMM path and the 2-64-token
# kernels)
SWEEP_CASES = [
    ("70b-up", 0.1, 2048), ("7b-up", 1.0, 2048), ("7b-up", 0.1, 128), ("7b-up", 0.55, 256),
    ("7b-down", 0.55, 256), ("70b-up", 0.55, 256), ("7b-up", 0.55, 64),
    # a narrow layer inside the prefill kernels' default range: 128-row stage-2 blocks leave half the SMs idle
    ("7b-qo", 0.55, 96),
]  # fmt: skip
# where the prefill kernels take over from the 2-64-token tensor-core kernels: both, on these (batch-64
# decoding is 64 tokens a call)
THRESHOLD_CASES = [
    ("7b-qo", 0.1, 65), ("7b-up", 0.1, 256), ("7b-up", 0.55, 256), ("7b-down", 1.0, 128),
    ("7b-qo", 0.55, 64), ("7b-up", 0.55, 64), ("7b-down", 0.55, 64), ("7b-up", 0.55, 32),
]  # fmt: skip


def sweep_tiles(device: str, save) -> list[dict]:
    """µs of each ``SWEEP`` tile of the prefill kernels on ``SWEEP_CASES`` (the GEMM path switched off), for
    choosing the tile rule, and of both register-decoding families on ``THRESHOLD_CASES``."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    records = []
    for name, bpw, m in SWEEP_CASES:
        d_in, d_out = LAYERS[name]
        layer = random_layer(d_in, d_out, bpw, device, seed=1)
        x = torch.randn(m, d_in, device=device).bfloat16()
        for bm, br, bo, words, warps, stages in SWEEP:
            cfg = tk.KernelConfig(
                prefill_tokens=bm, prefill_rows=br, prefill_out=bo, prefill_words=words,
                prefill_warps=warps, prefill_stages=stages, prefill_min_tokens=2, gemm_min_tokens=1 << 30,
            )  # fmt: skip
            rec = {"layer": name, "bpw": bpw, "tokens": m, "tile": [bm, br, bo, words, warps, stages]}
            try:
                rec["us"] = gpu_us(
                    lambda c=cfg, x=x, t=layer: tk.littlebit_linear_triton(x, *t, config=c), device
                )
            except Exception as e:  # e.g. out of shared memory: recorded, the others still run
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
            print(rec, flush=True)
            save()
    for name, bpw, m in THRESHOLD_CASES:
        d_in, d_out = LAYERS[name]
        layer = random_layer(d_in, d_out, bpw, device, seed=2)
        x = torch.randn(m, d_in, device=device).bfloat16()
        never = 1 << 30  # neither family gives way to the GEMM path
        for family, cfg in [
            ("prefill", tk.KernelConfig(prefill_min_tokens=2, gemm_min_tokens=never)),
            ("tensor-core", tk.KernelConfig(prefill_min_tokens=never, gemm_min_tokens=never)),
        ]:
            rec = {"layer": name, "bpw": bpw, "tokens": m, "tile": family}
            try:
                rec["us"] = gpu_us(
                    lambda c=cfg, x=x, t=layer: tk.littlebit_linear_triton(x, *t, config=c), device
                )
            except Exception as e:  # recorded, the others still run
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
            print(rec, flush=True)
            save()
    return records


# where the GEMM path takes over from the kernels that decode signs in registers: both, on these layers
# and BPW, at these tokens (below 65 tokens those are the tensor-core kernels, from 65 the prefill ones)
GEMM_THRESHOLD_CASES = [
    ("7b-qo", 0.1),
    *((name, bpw) for name in ("7b-up", "7b-down", "70b-up") for bpw in (0.1, 0.55, 1.0)),
]
GEMM_THRESHOLD_TOKENS = [32, 64, 65, 96, 128, 192, 256, 512, 2048]


def gemm_threshold(device: str, save) -> list[dict]:
    """µs of the GEMM path and of the register-decoding kernels (``prefill_us``; ``family`` names
    them) on ``GEMM_THRESHOLD_CASES``, for choosing ``KernelConfig.gemm_min_tokens``."""
    from littlebit.kernels.gpu import triton_littlebit as tk
    from littlebit.kernels.gpu.route import kernel_family

    records = []
    for name, bpw in GEMM_THRESHOLD_CASES:
        d_in, d_out = LAYERS[name]
        layer = random_layer(d_in, d_out, bpw, device, seed=3)
        for m in GEMM_THRESHOLD_TOKENS:
            x = torch.randn(m, d_in, device=device).bfloat16()
            below = tk.KernelConfig(gemm_min_tokens=1 << 30)
            rec = {"layer": name, "bpw": bpw, "tokens": m, "family": kernel_family(m, below)}
            for family, cfg in [("gemm", tk.KernelConfig(gemm_min_tokens=1)), ("prefill", below)]:
                try:
                    rec[f"{family}_us"] = gpu_us(
                        lambda c=cfg, x=x, t=layer: tk.littlebit_linear_triton(x, *t, config=c), device
                    )
                except Exception as e:  # recorded, the others still run
                    rec[f"{family}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
            print(rec, flush=True)
            save()
    return records


def build_7b(tag: str, device: str):
    import decode

    return decode.build(f"7b-{tag}", device)


def bench_ttft(model, lengths: list[int], device: str, tag: str = "") -> dict:
    out = {}
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)

            def run(ids=ids):
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1)

            for _ in range(2):
                run()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"ttft_ms_{n}{tag}"] = 1e3 * statistics.median(times)
    return out


def bench_serve(model, batch: int, prompt_len: int, steps: int, device: str) -> float:
    """Tokens/s of batched greedy decoding, each step one CUDA graph replay."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad():
        pos = torch.arange(prompt_len, device=device)
        out = model(input_ids=prompt, past_key_values=cache, cache_position=pos, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt_len], device=device)
        start = prompt_len

        def step() -> None:
            o = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            tok.copy_(o.logits[:, -1:].argmax(-1))
            pos.add_(1)

        graph = common.capture_step(step)
        pos.fill_(start)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="two layers, 0.1 and 1.0 BPW, fewer runs")
    p.add_argument("--smoke", action="store_true", help="tiny layers only (CPU with TRITON_INTERPRET=1)")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--bpw", default="0.1,0.55,1.0")
    p.add_argument("--tokens", default="128,512,2048,8192")
    p.add_argument("--models", default="fp16,0.1,0.55,1.0", help="7B-shape models for ttft and serve")
    p.add_argument("--ttft", default="128,2048,8192", help="prompt lengths; empty to skip")
    p.add_argument("--serve", default="64,256", help="decoding batch sizes; empty to skip")
    p.add_argument("--steps", type=int, default=32, help="decoding steps timed per batch size")
    p.add_argument(
        "--reference-ttft",
        type=int,
        default=2048,
        help="prompt length also timed through the reference op (0: skip)",
    )
    p.add_argument("--kernel-config", help='JSON KernelConfig fields, e.g. {"prefill_tokens": 64}')
    p.add_argument(
        "--order",
        default="models,layers",
        help="sections in the order they run: layers, models, sweep (tiles and the threshold; --quick), "
        "gemm-threshold (the GEMM path against the prefill kernels around its threshold)",
    )
    p.add_argument("--out", default=str(common.RESULTS / "prefill.json"))
    args = p.parse_args()
    if args.quick:
        args.layers, args.bpw, args.tokens = "7b-up,70b-up", "0.1,1.0", "128,2048"
        args.models, args.ttft, args.serve, args.steps = "fp16,0.1", "2048", "256", 16
        args.order = "layers,models,sweep"
    if args.smoke:
        args.bpw, args.tokens, args.ttft, args.serve = "0.55,1.0", "65,130", "", ""
    import littlebit.kernels

    littlebit.kernels.register()
    from littlebit.kernels.gpu import triton_littlebit as tk

    if args.kernel_config:
        tk.DEFAULT_CONFIG = tk.KernelConfig(**json.loads(args.kernel_config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = {
        "date": datetime.date.today().isoformat(),
        "kernel_config": dataclasses.asdict(tk.DEFAULT_CONFIG),
        "device": common.device_name(),
        "torch": torch.__version__,
        "command": " ".join(["benchmarks/prefill.py", *sys.argv[1:]]),
        "layers": [],
        "models": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(payload, indent=2))

    for section in args.order.split(","):
        if section == "layers":
            payload["layers"] = bench_layers(args, device, save)
        elif section == "sweep" and device == "cuda":
            payload["sweep"] = sweep_tiles(device, save)
        elif section == "gemm-threshold" and device == "cuda":
            payload["gemm_threshold"] = gemm_threshold(device, save)
        elif section == "models" and device == "cuda":
            bench_models(args, device, payload, save)
        save()
    print(json.dumps(payload["models"], indent=1))
    print(out)


def bench_models(args, device: str, payload: dict, save) -> None:
    """Time to first token and batched decoding of the 7B shape, FP16 and packed."""
    lengths = [int(n) for n in args.ttft.split(",") if n]
    batches = [int(b) for b in args.serve.split(",") if b]
    if lengths or batches:
        for tag in args.models.split(","):
            torch.cuda.empty_cache()
            rec: dict = {"model": f"7b-{tag}"}
            try:
                model = build_7b(tag, device)
                rec.update(bench_ttft(model, lengths, device))
                if tag != "fp16" and args.reference_ttft:  # the path these calls took before
                    from littlebit.op import use_backend

                    with use_backend("reference"):
                        rec.update(bench_ttft(model, [args.reference_ttft], device, "_reference"))
                for b in batches:
                    rec[f"serve_tokens_per_s_{b}"] = bench_serve(model, b, 128, args.steps, device)
                    torch.cuda.empty_cache()
            except Exception as e:  # recorded, and the other models still run
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            model = None
            payload["models"].append(rec)
            add_ratios(payload["models"])
            print(rec, flush=True)
            save()


def add_ratios(models: list[dict]) -> None:
    """Each packed model's times and rates over FP16's (``*_vs_fp16``)."""
    base = next((r for r in models if r["model"] == "7b-fp16"), None)
    for r in models:
        for k in [k for k in r if k.startswith(("ttft_ms_", "serve_")) and not k.endswith("_fp16")]:
            if base and k in base:
                r[k + "_vs_fp16"] = r[k] / base[k]


if __name__ == "__main__":
    main()
