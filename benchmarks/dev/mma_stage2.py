"""Stage 2 of the batch-1 GEMV alone: the tensor-core kernel (``kernels.cuda_mma``) over its tiles.

    python3 benchmarks/dev/mma_stage2.py [--out benchmarks/results/mma_stage2.json]

For three batch-1 layers, times a CUDA graph of stage-2 calls only (sign words rotated among
copies larger than L2, t fixed) for every (16-row tiles, words a thread, warps) tile, next to the whole
call (Triton stage 1 + this stage 2, and the Triton-only default). The bytes stage 2 must read are the
S_U words and h; their rate is reported against a measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # layer_kernels.py
sys.path.insert(0, str(Path(__file__).parent))
from layer_kernels import (
    copy_bandwidth,
    import_kernel,
    n_copies,
    random_layer,
    rank_for_bpw,
    time_graph,
    write_records,
)  # noqa: E402

CASES = [(8192, 28672, 1.0), (8192, 28672, 0.1), (4096, 4096, 0.55)]
TILES = list(itertools.product((1, 2, 4), (1, 2, 4), (2, 4, 8), (0, 1)))


def single(mma, d_in: int, d_out: int, bpw: float, tiles: list, gen: torch.Generator) -> None:
    r = rank_for_bpw(d_in, d_out, bpw)
    W_r, t_len = math.ceil(r / 32), 32 * math.ceil(r / 32)
    u, _, h, _ = random_layer(d_in, d_out, r, "cuda", gen)
    t_pairs = (torch.randn(4 * t_len, generator=gen, device="cuda") * 0.01).half().view(torch.int32)
    y = torch.empty(1, d_out, dtype=torch.float16, device="cuda")
    for mt, wpt, warps, _stage in tiles:
        for _ in range(3):
            mma.stage2(t_pairs, u, h, None, y, W_r, t_len, 2, 1, mma.MmaTile(mt, wpt, warps), False)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mma_stage2.json"))
    ap.add_argument("--tiles", help="mt-wpt-warps,... (default: all 27)")
    ap.add_argument("--single", help="d_in,d_out,bpw: 3 stage-2 calls per --tiles tile, then exit (ncu)")
    args = ap.parse_args()
    tk = import_kernel("triton_littlebit")
    mma = import_kernel("cuda_mma")
    tiles = [tuple(map(int, t.split("-"))) for t in args.tiles.split(",")] if args.tiles else TILES
    tiles = [(*t, 0)[:4] for t in tiles]  # mt-wpt-warps[-stage]
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.single:
        d_in, d_out, bpw = (float(f) for f in args.single.split(","))
        single(mma, int(d_in), int(d_out), bpw, tiles, gen)
        return
    copy = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    records = []
    for d_in, d_out, bpw in CASES:
        r = rank_for_bpw(d_in, d_out, bpw)
        W_r = math.ceil(r / 32)
        u_bytes = 2 * d_out * W_r * 4 + 2 * d_out * 2
        g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
        layers = [(*random_layer(d_in, d_out, r, "cuda", gen), g) for _ in range(n_copies(u_bytes))]
        x = torch.randn(1, d_in, generator=gen, device="cuda").half()
        t_len = 32 * W_r
        t_pairs = (torch.randn(2 * t_len, generator=gen, device="cuda") * 0.01).half().view(torch.int32)
        t_pairs = torch.cat([t_pairs, t_pairs])  # int32 view of 2 * t_len halves: 2 paths of t_len words
        y = torch.empty(1, d_out, dtype=torch.float16, device="cuda")
        call, triton_only = (
            tk.littlebit_linear_triton,
            tk.KernelConfig(stage2_mma=False, stage2_bitserial=False),
        )
        whole = {
            "triton": time_graph([functools.partial(call, x, *c, config=triton_only) for c in layers], 20),
        }
        base = dict(d_in=d_in, d_out=d_out, bpw=bpw, rank=r, W_r=W_r, device=device, copy_gbps=round(copy, 1))
        print(
            f"{d_in}x{d_out} {bpw} BPW (W_r {W_r}): whole call, Triton: {whole['triton']:.2f} us", flush=True
        )
        for mt, wpt, warps, stage in tiles:
            tile = mma.MmaTile(mt, wpt, warps)
            cfg = tk.KernelConfig(
                stage2_mma=True,
                mma_rows=mt,
                mma_words=wpt,
                mma_warps=warps,
                stage2_bitserial=False,
            )
            calls = [
                functools.partial(mma.stage2, t_pairs, c[0], c[2], None, y, W_r, t_len, 2, 1, tile, False)
                for c in layers
            ]
            us2 = time_graph(calls, 20)
            call = functools.partial(tk.littlebit_linear_triton, x, config=cfg)
            us = time_graph([functools.partial(call, *c) for c in layers], 20)
            gbps = u_bytes / (us2 * 1e-6) / 1e9
            records.append(
                dict(
                    base, tile=f"{mt}-{wpt}-{warps}-{stage}", us_stage2=round(us2, 2), stage2_gbps=round(gbps)
                )
                | dict(us_call=round(us, 2), us_call_triton=round(whole["triton"], 2))
            )
            name = f"{mt}-{wpt}-{warps}-{stage}"
            print(f"  tile {name}: stage 2 {us2:6.2f} us ({gbps:5.0f} GB/s)  call {us:6.2f} us", flush=True)
        del layers
        torch.cuda.empty_cache()
    write_records(records, args.out)


if __name__ == "__main__":
    main()
