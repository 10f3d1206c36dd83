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
    python benchmarks/dev/ttft_compile.py --summarise benchmarks/results/ttft_bounds_h100_c.json  # no GPU

With ``fp16`` and ``no-linear`` in one run, a summary (``bounds`` in the file) puts each model's
decoder-linear FLOPs against its linears' time (its compiled time less ``no-linear``'s) and, for each
``--targets`` ratio to FP16, the rate the linears would need for the whole forward to take that
ratio: the time left for them is the target's share of FP16's time less the rest of the forward.
``no-linear``'s copies write each linear's output, so that time is slightly generous to the linears.

``--causal-attention`` runs every model's attention as SDPA with ``is_causal`` and no mask tensor
(the prompt has no padding and no cache). Compiled, transformers otherwise builds the causal mask as a
tensor (it leaves it to SDPA only outside compilation before torch 2.14), and the attention kernel
then computes the masked half too.
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


def use_causal_attention(model: nn.Module) -> None:
    """SDPA with ``is_causal`` and no mask tensor for ``model`` (module docstring)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("sdpa-causal", attention)
    AttentionMaskInterface.register("sdpa-causal", lambda *args, **kwargs: None)
    model.set_attn_implementation("sdpa-causal")


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


def linear_tflop(tag: str, layers: int, tokens: int) -> float:
    """TFLOPs of the decoder linears in one forward: the dense products for ``fp16``, the low-rank
    ones of both paths at the tag's BPW for ``lowrank-BPW`` and packed ``BPW``, none for ``no-linear``."""
    from littlebit.core.budget import rank_for_bpw
    from littlebit.runtime.synthetic import SHAPES

    h, f = SHAPES["llama-2-7b"]["hidden_size"], SHAPES["llama-2-7b"]["intermediate_size"]
    shapes = [(h, h)] * 4 + [(h, f)] * 2 + [(f, h)]  # q, k, v, o; gate, up; down
    if tag == "no-linear":
        return 0.0
    if tag == "fp16":
        flops = sum(2 * d_in * d_out for d_in, d_out in shapes)
    else:
        bpw = float(tag.removeprefix("lowrank-"))
        flops = sum(2 * 2 * rank_for_bpw(d_in, d_out, bpw, True) * (d_in + d_out) for d_in, d_out in shapes)
    return flops * tokens * layers / 1e12


def summarise(records: list[dict], targets: dict[str, float]) -> list[dict]:
    """Each model's linears against the rate a target ratio to FP16 asks of them (module docstring)."""
    by = {r["model"].removeprefix("7b-"): r for r in records}
    if "fp16" not in by or "no-linear" not in by:
        return []
    fp_ms, rest_ms = by["fp16"]["compiled_ms"], by["no-linear"]["compiled_ms"]
    rows = []
    for tag, r in by.items():
        if tag == "no-linear":
            continue
        tflop = linear_tflop(tag, r["layers"], r["tokens"])
        linear_ms = r["compiled_ms"] - rest_ms
        row = {
            "model": r["model"],
            "vs_fp16": round(r["compiled_ms"] / fp_ms, 3),
            "linear_tflop": round(tflop, 3),
            "linear_ms": round(linear_ms, 2),
            "linear_tflops": round(tflop / linear_ms * 1e3, 1),
        }
        target = targets.get(tag.removeprefix("lowrank-"))
        if target is not None:
            allowed = target * fp_ms - rest_ms
            row.update(target=target, linear_ms_allowed=round(allowed, 2))
            row["needed_tflops"] = round(tflop / allowed * 1e3, 1) if allowed > 0 else None
        rows.append(row)
    return rows


def _print_bounds(rows: list[dict]) -> None:
    print(f"{'model':18} {'vs FP16':>8} {'linear TFLOP':>13} {'linear ms':>10} {'TFLOP/s':>8} "
          f"{'target':>7} {'ms allowed':>11} {'TFLOP/s needed':>15}")  # fmt: skip
    for r in rows:
        need = r.get("needed_tflops")
        print(
            f"{r['model']:18} {r['vs_fp16']:8.3f} {r['linear_tflop']:13.3f} {r['linear_ms']:10.2f} "
            f"{r['linear_tflops']:8.1f} {r.get('target', ''):>7} {r.get('linear_ms_allowed', ''):>11} "
            f"{'' if 'target' not in r else need if need is not None else 'none fits':>15}"
        )


def _targets(text: str) -> dict[str, float]:
    try:
        return {bpw: float(ratio) for bpw, ratio in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise SystemExit(f"--targets: expected BPW=RATIO,..., got {text!r}") from None


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
    ap.add_argument(
        "--targets",
        default="0.1=0.25,0.55=0.5,1.0=1.2",
        help="time-to-first-token ratios to FP16 the summary asks of each BPW (BPW=RATIO,...)",
    )
    ap.add_argument("--causal-attention", action="store_true", help="SDPA's own causal mask, no mask tensor")
    ap.add_argument("--summarise", metavar="FILE", help="add the summary to an earlier run's file; no GPU")
    args = ap.parse_args()
    targets = _targets(args.targets)
    if args.summarise:
        import json

        path = Path(args.summarise)
        payload = json.loads(path.read_text())
        payload["bounds"] = rows = summarise(payload["records"], targets)
        if not rows:
            raise SystemExit(f"{path}: the summary needs fp16 and no-linear records")
        path.write_text(json.dumps(payload, indent=2))
        _print_bounds(rows)
        return 0
    if args.kernel_config:
        import json

        from littlebit.kernels.gpu import triton_littlebit as tk

        tk.DEFAULT_CONFIG = tk.KernelConfig(**json.loads(args.kernel_config))
    records = []
    for tag in args.models.split(","):
        model = build(tag, args.layers)
        if args.causal_attention:
            use_causal_attention(model)
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
    rows = summarise(records, targets)
    if rows:
        _print_bounds(rows)
    attention = "sdpa, is_causal, no mask tensor" if args.causal_attention else "transformers' sdpa"
    common.write_results(
        args.name, records, kernel_config=args.kernel_config, bounds=rows, attention=attention
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
