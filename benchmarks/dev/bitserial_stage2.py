"""Stage 2 alone: bit-serial binary MMAs (``kernels.cuda_bitserial``) against the fp16 tensor-core
stage 2 (``kernels.cuda_mma``, the shipped tile rule), on the same sign words.

    python3 benchmarks/dev/bitserial_stage2.py [--tiles 1-1-4-4,2-1-4-4] [--cases 8192-28672-1.0[-rank]]

First checks the bit-serial kernels against ``sum_p h_p * (S_p @ t_p)`` in fp32 (unquantized t) on
small and odd shapes, then times per case (CUDA graphs, weight copies larger than L2, median):
``us_mma`` the shipped stage 2, ``us_quantize`` the planes kernel alone, ``us_bitserial`` stage 2
alone, ``us_both`` quantize + stage 2 (what a call pays), each bit-serial tile.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # layer_kernels.py
sys.path.insert(0, str(Path(__file__).parent))
from layer_kernels import (  # noqa: E402
    copy_bandwidth,
    import_kernel,
    random_layer,
    stage2_inputs,
    time_graph,
    write_records,
)
from mask_decode_probe import pairs as fp16_pairs  # noqa: E402

from littlebit.core.packing import tile_order, unpack_signs, untile_order  # noqa: E402  (kernels put src on the path)

CASES = [(8192, 28672, 1.0), (8192, 28672, 0.55), (28672, 8192, 1.0), (4096, 4096, 0.55), (8192, 28672, 0.1),
         (4096, 11008, 1.0)]  # fmt: skip
TILES = "1-1-4-4,2-1-4-4,1-1-8-4,1-2-4-4,1-4-2-2,2-2-2-4,1-1-4-8,1-4-1-4"


def tile_of(spec: str, bs):
    """mt-ks-rg-depth, then ``-f`` for sign words in tile order (``packing.tile_order``)."""
    mt, ks, rg, depth = (int(v) for v in spec.split("-")[:4])
    return bs.BitTile(mt, ks, rg, depth, tiled=spec.endswith("-f"))


def signs_for(tile, u: torch.Tensor) -> torch.Tensor:
    return tile_order(u) if tile.tiled else u


def ref_stage2(u, h, t, r) -> torch.Tensor:
    s = unpack_signs(u, r, torch.float64)
    return sum(h[p].double() * (s[p] @ t[p, :r].double()) for p in range(u.shape[0]))


def check(bs, tile, d_out: int, r: int, dtype, gen: torch.Generator, scale_spread: bool) -> float:
    W_r = math.ceil(r / 32)
    u, _, h, _ = random_layer(8, d_out, r, "cuda", gen)
    h = h.to(dtype)
    t = torch.randn(2, 32 * W_r, generator=gen, device="cuda")
    if scale_spread:  # per-entry magnitudes over 3 decades, as l spreads them
        t *= 10 ** (3 * torch.rand(2, 32 * W_r, generator=gen, device="cuda") - 2)
    t[:, r:] = 0
    ws = torch.empty(bs.workspace_floats(2, W_r), device="cuda")
    y = torch.empty(1, d_out, dtype=dtype, device="cuda")
    bs.quantize(t, ws, r, W_r, 2, False, 32 * W_r)
    bs.gemv(ws, signs_for(tile, u), h, None, y, W_r, 2, 1, tile, False)
    ref = ref_stage2(u, h, t, r)
    return ((y.double()[0] - ref).norm() / ref.norm()).item()


def quantize_then_stage2(bs, t, ws, layer, y, W_r, tile) -> None:
    bs.quantize(t, ws, t.shape[1], W_r, 2, True, t.shape[1])
    bs.gemv(ws, layer[0], layer[2], None, y, W_r, 2, 1, tile, True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", default=TILES, help="mt-ks-rg-depth,...")
    ap.add_argument("--cases", default="", help="d_in-d_out-bpw[-rank],... (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bitserial_stage2.json"))
    args = ap.parse_args()
    bs, mma = import_kernel("cuda_bitserial"), import_kernel("cuda_mma")
    tl = import_kernel("triton_littlebit")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tiles = args.tiles.split(",")
    worst = 0.0
    for spec in tiles:
        for d_out, r in [(24, 8), (100, 70), (576, 296), (1000, 3168), (333, 520)]:
            for dtype in (torch.float16, torch.bfloat16):
                for spread in (False, True):
                    err = check(bs, tile_of(spec, bs), d_out, r, dtype, gen, spread)
                    worst = max(worst, err)
                    # bf16 outputs alone are rounded to 2^-9 relative (rms ~1e-3 over few rows)
                    assert err < (2e-3 if dtype == torch.float16 else 4e-3), (
                        spec,
                        d_out,
                        r,
                        dtype,
                        spread,
                        err,
                    )
    print(f"bit-serial stage 2 matches sum_p h_p (S_p t_p): worst relative error {worst:.2e}", flush=True)
    cases = CASES
    if args.cases:
        specs = (s.split("-") for s in args.cases.split(","))
        cases = [(int(a), int(b), float(c), *map(int, rk)) for a, b, c, *rk in specs]
    copy = copy_bandwidth()
    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    records = []
    for d_in, d_out, bpw, *rank in cases:
        r, W_r, u_bytes, layers, t = stage2_inputs(d_in, d_out, bpw, gen, *rank)
        t_len = 32 * W_r
        pairs = fp16_pairs(t, W_r, scaled=False)[0]
        y = torch.empty(1, d_out, dtype=torch.float16, device="cuda")
        tiled_now = False
        mtile = tl._mma_tile(d_out, W_r, 2, 1, tl.KernelConfig(), sms)
        shipped = functools.partial(
            mma.stage2, pairs, W_r=W_r, t_len=t_len, paths=2, groups=1, tile=mtile, pdl=False
        )
        us_mma = time_graph([functools.partial(shipped, u=c[0], h=c[2], bias=None, y=y) for c in layers], 20)
        ws = torch.empty(bs.workspace_floats(2, W_r), device="cuda")
        us_q = time_graph(
            [functools.partial(bs.quantize, t, ws, t_len, W_r, 2, False, t_len)] * len(layers), 20
        )
        base = dict(d_in=d_in, d_out=d_out, bpw=bpw, rank=r, device=device, copy_gbps=round(copy, 1))
        base |= dict(us_mma=round(us_mma, 2), mma_tile=f"{mtile.mt}-{mtile.wpt}-{mtile.warps}")
        base["us_quantize"] = round(us_q, 2)
        print(f"{d_in}x{d_out} {bpw} BPW: fp16-MMA stage 2 {us_mma:6.2f} us, quantize {us_q:5.2f} us")
        for spec in tiles:
            tile = tile_of(spec, bs)
            if tile.tiled != tiled_now:  # -f tiles: the same layers' S_U in tile order
                order = functools.partial(signs_for, tile) if tile.tiled else untile_order
                layers = [(order(c[0]), *c[1:]) for c in layers]
                tiled_now = tile.tiled
            alone = [
                functools.partial(bs.gemv, ws, c[0], c[2], None, y, W_r, 2, 1, tile, False) for c in layers
            ]
            us_b = time_graph(alone, 20)
            both = [functools.partial(quantize_then_stage2, bs, t, ws, c, y, W_r, tile) for c in layers]
            us_both = time_graph(both, 20)
            rec = base | dict(tile=spec, us_bitserial=round(us_b, 2), us_both=round(us_both, 2))
            rec["gbps"] = round(u_bytes / (us_b * 1e-6) / 1e9)
            rec["speedup_alone"] = round(us_mma / us_b, 3)
            records.append(rec)
            print(
                f"  tile {spec}: stage 2 {us_b:6.2f} us ({rec['gbps']} GB/s of {copy:.0f}, "
                f"{rec['speedup_alone']:.2f}x), with quantize (PDL) {us_both:6.2f} us",
                flush=True,
            )
        del layers
        torch.cuda.empty_cache()
    write_records(records, args.out)


if __name__ == "__main__":
    main()
