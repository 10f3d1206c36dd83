"""Probe: would a cheaper sign decoding speed up the tensor-core stage 2 (``kernels.cuda_mma``)?

    python3 benchmarks/dev/mask_decode_probe.py [--out benchmarks/results/mask_decode_probe.json]

The shipped kernel spends two instructions per sign pair: a shift that brings bits i and i + 16 to the
fp16 sign positions and a lop3 that makes (+-1, +-1). This probe decodes with one AND per pair
instead: ``w & (0x00010001 << p)`` leaves bits p and p + 16 in place, and for p < 8 each half is then
the fp16 subnormal ``b * 2^(p - 24)`` (b the bit). A word's pairs 8-15 come from ``w >> 8`` (one shift
per word), so every pair needs one lop3. The MMA's other operand must carry ``t * 2^(F - p)`` (here
F = 0, so no t can overflow that did not already), and the kernel scales its sums by 2^(25 - F), which
gives 2 * sum(b * t); the signed sum is that minus sum(t), a per-path constant that a real kernel
would take from stage 1. So this is stage 2 alone, checked against ``2 * h * (b @ t)`` from the
unpacked bits, and timed next to the shipped kernel on the same words (CUDA graphs, copies larger
than L2). It does not ship: the narrower range it leaves t (subnormals below 2^-7) needs a scale that
stage 1 does not compute yet.
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

CASES = [(8192, 28672, 1.0), (8192, 28672, 0.55), (28672, 8192, 1.0), (4096, 4096, 0.55), (8192, 28672, 0.1)]
TILES = [(2, 1, 8), (4, 1, 4), (4, 1, 8), (1, 2, 8), (2, 2, 4)]

# The shipped decoding loop of ``decode_unit`` (the MMAs of one word step j): from its first line to
# the end of its MMA call, found in the kernel's source rather than restated here.
LOOP_START = "        #pragma unroll\n        for (int s = 0; s < 8; ++s)\n"
LOOP_END = "bb[2 * s], bb[2 * s + 1]);\n"
MASK_LOOP = """        u32 src[2][MT][2];  // pairs 0-7 from w, pairs 8-15 from w >> 8
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                src[0][m][hf] = a[j][m][hf];
                src[1][m][hf] = a[j][m][hf] >> 8;
            }
        #pragma unroll
        for (int s = 0; s < 8; ++s) {
            const int k = s >> 2;
            const u32 m0 = 0x00010001u << ((2 * s) & 7), m1 = 0x00010001u << ((2 * s + 1) & 7);
            #pragma unroll
            for (int m = 0; m < MT; ++m)
                mma(d[m], src[k][m][0] & m0, src[k][m][1] & m0, src[k][m][0] & m1, src[k][m][1] & m1,
                    bb[2 * s], bb[2 * s + 1]);
        }
"""
BIAS_LINE = "        if (has_bias) s += h2f(bias[row]);"
SCALE_LINE = "        s *= 33554432.f;  // 2^25: back from the subnormal A values\n"


def mask_source(mma) -> str:
    src = mma.SOURCE
    assert src.count(LOOP_START) == 1 and BIAS_LINE in src, "the shipped kernel changed"
    start = src.index(LOOP_START)
    end = src.index(LOOP_END, start) + len(LOOP_END)
    assert "sign_pair(" in src[start:end], "the shipped kernel changed"
    return (src[:start] + MASK_LOOP + src[end:]).replace(BIAS_LINE, SCALE_LINE + BIAS_LINE)


def pairs(t: torch.Tensor, W_r: int, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 32 W_r) fp32 -> (int32 words: pair i of word k of path p at p * 32 W_r + 32 k + i, halves
    (t[32k + i], t[32k + i + 16]) times 2^-(i mod 8) when ``scaled``; those halves as fp32)."""
    P = t.shape[0]
    tw = t.view(P, W_r, 2, 16)
    if scaled:
        tw = tw * (2.0 ** -(torch.arange(16, device=t.device) % 8)).view(1, 1, 1, 16)
    halves = tw.half()
    lo = halves[:, :, 0].view(torch.int16).to(torch.int32) & 0xFFFF
    hi = halves[:, :, 1].view(torch.int16).to(torch.int32) << 16
    out = torch.zeros(P, W_r, 32, dtype=torch.int32, device=t.device)
    out[:, :, :16] = lo | hi
    return out.reshape(-1), halves.float()


def check(mma, tile, d_out: int, r: int, gen: torch.Generator) -> float:
    W_r = math.ceil(r / 32)
    u, _, h, _ = random_layer(8, d_out, r, "cuda", gen)
    t = torch.randn(2, 32 * W_r, generator=gen, device="cuda")
    t[:, r:] = 0
    tp, th = pairs(t, W_r, scaled=True)
    t_seen = (th * (2.0 ** (torch.arange(16, device="cuda") % 8)).view(1, 1, 1, 16)).reshape(2, -1)
    y = torch.empty(1, d_out, dtype=torch.float16, device="cuda")
    mma.stage2(tp, u, h, None, y, W_r, 32 * W_r, 2, 1, tile, False, mask_source(mma))
    bits = ((u.unsqueeze(-1) >> torch.arange(32, device="cuda")) & 1).reshape(2, d_out, -1).float()
    ref = sum(2 * h[p].float() * (bits[p] @ t_seen[p]) for p in range(2))
    return ((y.float()[0] - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_decode_probe.json"))
    args = ap.parse_args()
    mma = import_kernel("cuda_mma")
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = mask_source(mma)
    for d_out, r in [(24, 8), (100, 70), (576, 296), (1000, 3168)]:
        for mt, wpt, warps in TILES:
            err = check(mma, mma.MmaTile(mt, wpt, warps), d_out, r, gen)
            assert err < 2e-3, (d_out, r, mt, wpt, warps, err)
    print("mask decoding matches 2 h (b @ t) on 4 shapes x 5 tiles", flush=True)
    copy = copy_bandwidth()
    device = torch.cuda.get_device_name()
    records = []
    for d_in, d_out, bpw in CASES:
        r, W_r, u_bytes, layers, t = stage2_inputs(d_in, d_out, bpw, gen)
        t_len = 32 * W_r
        t_plain, _ = pairs(t, W_r, scaled=False)
        t_mask, _ = pairs(t, W_r, scaled=True)
        y = torch.empty(1, d_out, dtype=torch.float16, device="cuda")
        for mt, wpt, warps in TILES:
            tile = mma.MmaTile(mt, wpt, warps)
            us = {}
            for name, tp, source in [("shipped", t_plain, mma.SOURCE), ("mask", t_mask, src)]:
                calls = [
                    functools.partial(
                        mma.stage2, tp, c[0], c[2], None, y, W_r, t_len, 2, 1, tile, False, source
                    )
                    for c in layers
                ]
                us[name] = time_graph(calls, 20)
            rec = dict(d_in=d_in, d_out=d_out, bpw=bpw, rank=r, tile=f"{mt}-{wpt}-{warps}", device=device)
            rec |= {f"us_{k}": round(v, 2) for k, v in us.items()}
            rec |= dict(speedup=round(us["shipped"] / us["mask"], 3), copy_gbps=round(copy, 1))
            rec["mask_gbps"] = round(u_bytes / (us["mask"] * 1e-6) / 1e9)
            records.append(rec)
            print(
                f"{d_in}x{d_out} {bpw} BPW tile {mt}-{wpt}-{warps}: shipped {us['shipped']:6.2f} us, "
                f"mask {us['mask']:6.2f} us ({rec['speedup']:.2f}x, {rec['mask_gbps']} GB/s of {copy:.0f})",
                flush=True,
            )
        del layers
        torch.cuda.empty_cache()
    write_records(records, args.out)


if __name__ == "__main__":
    main()
