"""A finer sweep of the prefill tile on the layer where it matters most, then the best few elsewhere.

``benchmarks/prefill.py --quick`` tries seven tiles on three layers. This tries ``TILES`` on the first
``--cases`` entry (by default the 8192x28672 layer at 0.1 BPW with 2048 tokens), next to cuBLAS bf16 on
the dense weight, checks each result against the shipped tile's, then times the ``--best`` fastest
and the shipped rule on the other cases. µs are medians of one CUDA graph of calls (``prefill.gpu_us``).

    python benchmarks/dev/prefill_tiles.py                                       # GPU, about a minute
    TRITON_INTERPRET=1 python benchmarks/dev/prefill_tiles.py --smoke             # CPU: the code path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import prefill  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (tokens, stage-1 rows, stage-2 rows, words, warps, stages); the first is the shipped rule's choice
# for the default case, the others change one or two fields from it.
TILES = [
    (64, 64, 128, 2, 4, 3),
    (64, 64, 128, 2, 4, 2),
    (64, 64, 128, 2, 4, 4),
    (64, 64, 128, 1, 4, 3),
    (64, 64, 128, 4, 4, 3),
    (64, 64, 64, 2, 4, 3),
    (64, 64, 256, 2, 8, 3),
    (64, 64, 128, 2, 8, 3),
    (64, 32, 128, 2, 4, 3),
    (64, 128, 128, 2, 4, 3),
    (32, 64, 128, 2, 4, 3),
    (32, 64, 256, 2, 4, 3),
    (32, 64, 128, 2, 2, 3),
    (128, 64, 64, 2, 4, 3),
    (128, 64, 64, 2, 8, 3),
    (64, 64, 64, 4, 4, 4),
]
CASES = ["70b-up:0.1:2048", "7b-up:0.1:2048", "7b-qo:0.1:2048", "7b-up:1.0:2048", "7b-down:0.55:2048"]
SMOKE = ["smoke-b:0.5:80", "smoke-a:0.5:70"]


def config(tile):
    from littlebit.kernels.gpu import triton_littlebit as tk

    if tile is None:
        return tk.KernelConfig()
    bm, br, bo, words, warps, stages = tile
    return tk.KernelConfig(
        prefill_tokens=bm, prefill_rows=br, prefill_out=bo, prefill_words=words,
        prefill_warps=warps, prefill_stages=stages,
    )  # fmt: skip


def run_case(case: str, tiles: list, device: str, dense: bool) -> list[dict]:
    from littlebit.kernels.gpu import triton_littlebit as tk

    name, bpw, m = case.split(":")
    d_in, d_out = {**prefill.LAYERS, **prefill.SMOKE_LAYERS}[name]
    layer = prefill.random_layer(d_in, d_out, float(bpw), device, seed=1)
    x = torch.randn(int(m), d_in, device=device).bfloat16()
    ref = tk.littlebit_linear_triton(x, *layer).float()
    base = {"layer": name, "d_in": d_in, "d_out": d_out, "bpw": float(bpw), "tokens": int(m)}
    records = []
    if dense:
        w = torch.randn(d_out, d_in, device=device).bfloat16()
        records.append({**base, "tile": "cuBLAS dense", "us": prefill.gpu_us(lambda: F.linear(x, w), device)})
        del w
    for tile in tiles:
        cfg = config(tile)
        rec = {**base, "tile": list(tile) if tile else "shipped rule"}
        try:
            y = tk.littlebit_linear_triton(x, *layer, config=cfg).float()
            rec["diff_vs_shipped"] = ((y - ref).norm() / ref.norm()).item()
            rec["us"] = prefill.gpu_us(lambda c=cfg: tk.littlebit_linear_triton(x, *layer, config=c), device)
        except Exception as e:  # e.g. out of shared memory: recorded, the others still run
            rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=None, help="LAYER:BPW:TOKENS, the first swept fully")
    ap.add_argument("--best", type=int, default=3, help="fastest tiles of the first case timed on the rest")
    ap.add_argument("--smoke", action="store_true", help="tiny layers, two tiles (CPU interpreter)")
    ap.add_argument("--name", default="prefill_tiles", help="results file name under benchmarks/results")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = args.cases or (SMOKE if args.smoke else CASES)
    tiles = [(32, 32, 32, 1, 4, 2), (64, 32, 64, 2, 4, 2)] if args.smoke else TILES
    records = run_case(cases[0], [None, *tiles], device, dense=not args.smoke)
    common.write_results(args.name, records)  # after each case: a run cut short keeps what it timed
    timed = [r for r in records if isinstance(r["tile"], list) and "us" in r]
    best = [tuple(r["tile"]) for r in sorted(timed, key=lambda r: r["us"])[: args.best]]
    for case in cases[1:]:
        records += run_case(case, [None, *best], device, dense=not args.smoke)
        common.write_results(args.name, records)
    print(f"wrote {common.RESULTS / args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
