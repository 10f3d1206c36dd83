"""How fast does the GEMM path write its factors? The expansion of ``kernels.gpu.gemm`` on the
Llama-2-7B and -70B shapes at 0.1/0.55/1.0 BPW, S_U row-ordered and in tile order: µs for A and B
together (median of a replayed CUDA graph), the bandwidth that makes (16-bit entries written plus sign
words read), and the whole GEMM-path call at ``--tokens``. Prints one line per case and writes
``benchmarks/results/<--name>.json``.

    python benchmarks/dev/gemm_expand.py      # GPU: about a minute
    TRITON_INTERPRET=1 python benchmarks/dev/gemm_expand.py --layers smoke-a,smoke-b --tokens 64 --name x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from prefill import LAYERS, SMOKE_LAYERS, gpu_us, random_layer  # noqa: E402


def time_kernel(layer: list[torch.Tensor], x: torch.Tensor, tiled: bool, device: str) -> tuple:
    """µs of the expansion alone and of the whole GEMM-path call."""
    from littlebit.kernels.gpu import triton_littlebit as tk
    from littlebit.kernels.gpu.gemm import expanded_factors

    u, v, h, l, g = layer
    cfg = tk.KernelConfig(gemm_min_tokens=1)
    expand_us = gpu_us(lambda: expanded_factors(u, v, h, l, g, torch.bfloat16, tiled), device)
    call_us = gpu_us(lambda: tk.littlebit_linear_triton(x, u, v, h, l, g, config=cfg, u_tiled=tiled), device)
    return expand_us, call_us


def main() -> int:
    from littlebit.core.packing import tile_order

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="7b-qo,7b-up,7b-down,70b-up")
    ap.add_argument("--bpw", default="0.1,0.55,1.0")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the whole-call timing")
    ap.add_argument("--name", default="gemm_expand")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for name in args.layers.split(","):
        d_in, d_out = {**LAYERS, **SMOKE_LAYERS}[name]
        for bpw in (float(b) for b in args.bpw.split(",")):
            u, v, h, l, g = random_layer(d_in, d_out, bpw, device, seed=11)
            r = l.shape[-1]
            moved = 2 * 2 * r * (d_in + d_out) + 4 * (u.numel() + v.numel())
            x = torch.randn(args.tokens, d_in, device=device).bfloat16()
            for tiled in (False, True) if d_out % 16 == 0 else (False,):  # tile order: 16-row tiles
                layer = [tile_order(u) if tiled else u, v, h, l, g]
                rec = {"layer": name, "d_in": d_in, "d_out": d_out, "bpw": bpw, "rank": r, "u_tiled": tiled}
                rec["expand_us"], rec["call_us"] = time_kernel(layer, x, tiled, device)
                rec["expand_tb_per_s"] = moved / rec["expand_us"] / 1e6
                records.append(rec)
                print(
                    f"{name:8} {bpw:5} {'tiled' if tiled else 'rows ':5}"
                    f"  expansion {rec['expand_us']:8.1f} µs ({rec['expand_tb_per_s']:.2f} TB/s)"
                    f"   call at {args.tokens} tokens {rec['call_us']:8.1f} µs",
                    flush=True,
                )
    print(common.write_results(args.name, records, tokens=args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
