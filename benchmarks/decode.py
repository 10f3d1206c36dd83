"""End-to-end greedy decoding: FP16 versus LittleBit.

Batch 1, a static KV cache, and the whole decode step captured in one CUDA graph (so launch
overhead is paid once per token); ``--compile`` additionally runs the decode step through
torch.compile to fuse the elementwise work (norms, rotary, activations) around the linear layers
(the packed product is one opaque custom op, so the model compiles to one graph). Prefill stays
eager under ``--compile``: compiling a second shape doubled the compile time, and prefill is timed
only for the time to first token. The same recipe is applied to every model, so the ratios compare
like with like; ``--group`` runs q/k/v and gate/up as one call each, for FP16 (one concatenated
weight) as for LittleBit (one grouped kernel call).

    python benchmarks/decode.py --models 7b-fp16,7b-0.1,7b-0.55,7b-1.0 --compile --group
    python benchmarks/decode.py --models smollm-fp16,smollm-0.1,smollm-0.55,smollm-1.0 --compile --group
    python benchmarks/decode.py --device cpu --models smollm-fp32,smollm-0.55   # eager, 2 threads
    python benchmarks/decode.py --tag decode_no_pdl --kernel-config '{"pdl": false}'

Results go to benchmarks/results/decode.json (Llama-2-7B shape), decode_smollm.json (only the
default model, on the GPU) or decode_cpu.json (``--device cpu``) unless ``--tag`` names another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import common
import torch
from torch import nn


def build(name: str, device: str) -> nn.Module:
    from littlebit.runtime.synthetic import random_dense_llama, random_packed_llama

    if name.startswith("7b-"):
        tag = name[3:]
        if tag != "fp16":
            return random_packed_llama("llama-2-7b", float(tag), device, torch.float16)
        return random_dense_llama("llama-2-7b", device, torch.float16)
    from littlebit import LittleBitConfig, pack_model
    from littlebit.core.convert import convert
    from littlebit.hf.format import cast_unquantized
    from littlebit.hf.models import load_model

    tag = name.split("-", 1)[1]
    dense = {"fp16": torch.float16, "fp32": torch.float32}
    model = load_model(None, dense.get(tag, torch.float32), device)
    if tag not in dense:
        convert(model, LittleBitConfig(bpw=float(tag)), compute_device=device, progress=False)
        pack_model(model)
        if device == "cuda":
            cast_unquantized(model, torch.float16)
    return model.eval()


def bench_cpu(model: nn.Module, prompt_len: int, new_tokens: int) -> dict:
    """Eager greedy decoding with the default dynamic cache: what a CPU user runs."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        ttft, rates = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, do_sample=False)
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(prompt, **kw)
            rates.append(new_tokens / (time.perf_counter() - t0 - ttft[-1]))
    return {"ttft_ms": 1e3 * statistics.median(ttft), "tokens_per_s": statistics.median(rates)}


def bench(model: nn.Module, prompt_len: int, new_tokens: int, use_compile: bool, device: str) -> dict:
    from transformers import StaticCache

    forward = model.forward
    step_forward = torch.compile(model.forward, dynamic=False) if use_compile else model.forward
    max_len = prompt_len + new_tokens + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)

    def prefill() -> torch.Tensor:
        cache.reset()
        pos = torch.arange(prompt_len, device=device)
        logits = forward(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    with torch.no_grad():
        for _ in range(2):  # warm-up: compilation and autotuning stay out of the numbers
            prefill()
        torch.cuda.synchronize()
        ttft = []
        for _ in range(5):
            t0 = time.perf_counter()
            first = prefill()
            torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t0)

        tok = first.clone()
        pos = torch.tensor([prompt_len], device=device)

        def step() -> None:
            out = step_forward(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            logits = out.logits
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        try:
            graph = common.capture_step(step)
            run, mode = graph.replay, "cuda-graph"
        except Exception as e:  # a step that cannot be captured is timed eagerly, and says so
            print(f"graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eagerly", flush=True)
            torch.cuda.synchronize()
            run, mode = step, "eager"
        rates = []
        for _ in range(3):
            prefill()
            tok.copy_(first)
            pos.fill_(prompt_len)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                run()
            torch.cuda.synchronize()
            rates.append(new_tokens / (time.perf_counter() - t0))
    return {"ttft_ms": 1e3 * statistics.median(ttft), "tokens_per_s": statistics.median(rates), "mode": mode}


def effective_kernel_config() -> dict | None:
    """The Triton kernels' settings in force (the defaults change between versions), if Triton is here."""
    try:
        from littlebit.kernels.gpu import triton_littlebit
    except ImportError:
        return None
    return dataclasses.asdict(triton_littlebit.DEFAULT_CONFIG)


def write(records: list[dict], args: argparse.Namespace) -> None:
    dense = [r for r in records if r["model"].endswith(("fp16", "fp32"))]
    by_family = {r["model"].split("-")[0]: r["tokens_per_s"] for r in dense}
    for r in records:
        base = by_family.get(r["model"].split("-")[0])
        r["speedup_vs_dense"] = r["tokens_per_s"] / base if base else None
    smollm = all(m.startswith("smollm-") for m in args.models.split(","))
    tag = args.tag or ("decode_cpu" if args.device == "cpu" else "decode_smollm" if smollm else "decode")
    common.write_results(tag, records, prompt_len=args.prompt_len, new_tokens=args.new_tokens)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="7b-fp16,7b-0.1,7b-0.55,7b-1.0")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--group", action="store_true", help="q/k/v and gate/up as one call each")
    p.add_argument("--tag", help="results file name (default decode, decode_smollm or decode_cpu)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--kernel-config",
        help='JSON KernelConfig fields for the Triton kernels, e.g. {"pdl": false}',
    )
    args = p.parse_args()
    import littlebit.kernels

    littlebit.kernels.register()

    kernel_config = json.loads(args.kernel_config) if args.kernel_config else None
    if kernel_config:
        from littlebit.kernels.gpu import triton_littlebit

        triton_littlebit.DEFAULT_CONFIG = triton_littlebit.KernelConfig(**kernel_config)
    from littlebit.hf.report import memory_bytes
    from littlebit.op import available_backends

    device = args.device
    if device == "cpu":
        torch.set_num_threads(2)
    records = []
    for name in args.models.split(","):
        if device == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = build(name, device)
        if args.group:
            from littlebit.runtime.grouping import group_projections

            group_projections(model)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec = {
            "model": name,
            "compile": args.compile,
            "grouped": args.group,
            "bytes": memory_bytes(model),
            "backends": available_backends(),
            "kernel_config": effective_kernel_config(),
        }
        if device == "cuda":
            rec.update(bench(model, args.prompt_len, args.new_tokens, args.compile, device))
        else:
            rec.update(bench_cpu(model, args.prompt_len, args.new_tokens))
        rec.update(build_s=built, bench_s=time.perf_counter() - t0)
        records.append(rec)
        print(rec, flush=True)
        del model
        # after every model, so a run stopped by a time limit keeps what it measured
        write(records, args)
    print(f"\n{'model':<14} {'GB':>6} {'TTFT ms':>8} {'tok/s':>8} {'vs dense':>8}")
    for r in records:
        speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
        print(
            f"{r['model']:<14} {r['bytes'] / 1e9:>6.2f} {r['ttft_ms']:>8.2f} "
            f"{r['tokens_per_s']:>8.1f} {speed:>8}"
        )


if __name__ == "__main__":
    main()
