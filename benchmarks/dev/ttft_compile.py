"""Does compiling the prompt's forward close the gap? A few layers of the Llama-2-7B shape, FP16 dense
against packed, one ``--tokens`` forward (last logits kept), eager against ``torch.compile`` with
``mode="reduce-overhead"`` (Inductor's fused elementwise kernels, replayed as a CUDA graph). Medians
of ``--reps``; compilation time reported apart. Prints one line per case and writes
``benchmarks/results/<--name>.json``.

    python benchmarks/dev/ttft_compile.py --layers 8      # GPU: about two minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = common.clock()
        fn()
        times.append(1e3 * (common.clock() - t0))
    return statistics.median(times)


def main() -> int:
    from littlebit.runtime.synthetic import random_dense_llama, random_packed_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fp16,0.1")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--name", default="ttft_compile")
    ap.add_argument(
        "--kernel-config",
        help='JSON KernelConfig fields for the packed layers, e.g. {"gemm_min_tokens": 192}',
    )
    args = ap.parse_args()
    if args.kernel_config:
        import json

        from littlebit.kernels.gpu import triton_littlebit as tk

        tk.DEFAULT_CONFIG = tk.KernelConfig(**json.loads(args.kernel_config))
    records = []
    for tag in args.models.split(","):
        kw = {"num_hidden_layers": args.layers}
        if tag == "fp16":
            model = random_dense_llama("llama-2-7b", "cuda", torch.float16, **kw)
        else:
            model = random_packed_llama("llama-2-7b", float(tag), "cuda", torch.float16, **kw)
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")

        def forward(m=model, ids=ids):
            return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        with torch.no_grad():
            for _ in range(2):
                forward()
            eager = _timed(forward, args.reps)
            compiled = torch.compile(model, mode="reduce-overhead")
            t0 = common.clock()
            for _ in range(3):
                forward(compiled)
            compile_s = common.clock() - t0
            graph = _timed(lambda c=compiled: forward(c), args.reps)
        rec = {
            "model": f"7b-{tag}",
            "layers": args.layers,
            "tokens": args.tokens,
            "eager_ms": round(eager, 2),
            "compiled_ms": round(graph, 2),
            "compile_s": round(compile_s, 1),
        }
        records.append(rec)
        print(rec, flush=True)
        del model, compiled
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    common.write_results(args.name, records, kernel_config=args.kernel_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
