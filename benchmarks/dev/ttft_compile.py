"""Does compiling the prompt's forward close the gap? A few layers of the Llama-2-7B shape, FP16 dense
against packed, one ``--tokens`` forward (last logits kept), eager against ``torch.compile`` with
``mode="reduce-overhead"`` (Inductor's fused elementwise kernels, replayed as a CUDA graph). Medians
of ``--reps``; compilation time reported apart. Prints one line per case and writes
``benchmarks/results/<--name>.json``.

Two stand-ins bound what packed layers can reach on this forward: ``lowrank-BPW`` (every decoder
linear is the two fp16 cuBLAS GEMMs on unpacked factors of the packed layer's shape at that BPW: its
FLOPs at cuBLAS's rate, with no sign expansion at all) and ``no-linear`` (every decoder linear is a
copy of its input into its output's shape, no matrix product: the time of the rest of the forward,
norms, rotary, attention, activations and the head, which no layer kernel can remove).

    python benchmarks/dev/ttft_compile.py --layers 8      # GPU: about two minutes
    python benchmarks/dev/ttft_compile.py --models fp16,no-linear,lowrank-0.1,lowrank-0.55 --name ttft_bounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class UnpackedLowRank(nn.Module):
    """The packed layer's product on dense fp16 factors: x A^T B^T, the paths side by side."""

    def __init__(self, d_in: int, d_out: int, width: int, device: str) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(width, d_in, device=device, dtype=torch.float16) / d_in**0.5)
        self.b = nn.Parameter(torch.randn(d_out, width, device=device, dtype=torch.float16) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b)


class NoLinear(nn.Module):
    """A linear's shapes without its product: the input's first ``d_out`` features, tiled if wider."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reps = -(-self.d_out // self.d_in)
        wide = x.repeat(*([1] * (x.dim() - 1)), reps) if reps > 1 else x
        return wide[..., : self.d_out].contiguous()


def swap_linears(model: nn.Module, make) -> nn.Module:
    """Every decoder linear replaced by ``make(linear)``."""
    from littlebit.core.convert import set_submodule

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and ".layers." in name:
            set_submodule(model, name, make(m))
    return model


def build(tag: str, layers: int) -> nn.Module:
    from littlebit.core.budget import rank_for_bpw
    from littlebit.runtime.synthetic import random_dense_llama, random_packed_llama

    kw = {"num_hidden_layers": layers}
    if tag == "fp16":
        return random_dense_llama("llama-2-7b", "cuda", torch.float16, **kw)
    if tag == "no-linear":
        model = random_dense_llama("llama-2-7b", "cuda", torch.float16, **kw)
        model = swap_linears(model, lambda m: NoLinear(m.in_features, m.out_features))
        torch.cuda.empty_cache()
        return model
    if tag.startswith("lowrank-"):
        bpw = float(tag.removeprefix("lowrank-"))
        model = random_dense_llama("llama-2-7b", "cuda", torch.float16, **kw)

        def make(m: nn.Linear) -> nn.Module:
            width = 2 * rank_for_bpw(m.in_features, m.out_features, bpw, True)
            return UnpackedLowRank(m.in_features, m.out_features, width, "cuda")

        model = swap_linears(model, make)
        torch.cuda.empty_cache()
        return model
    return random_packed_llama("llama-2-7b", float(tag), "cuda", torch.float16, **kw)


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = common.clock()
        fn()
        times.append(1e3 * (common.clock() - t0))
    return statistics.median(times)


def main() -> int:
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
        model = build(tag, args.layers)
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
