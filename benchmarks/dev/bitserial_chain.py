"""Where the time of a bit-serial batch-1 call goes: its four kernels alone and chained (PDL), next to
whole calls of the default, the bit-serial stage 1 (quantizing x and t itself, or in launches of
their own), the Triton stage 1 (ending in the planes of t, or writing t for the quantize kernel) +
bit-serial stage 2, and the fp16 tensor-core stage 2.

    python3 benchmarks/dev/bitserial_chain.py [--cases 8192-28672-1.0,8192-28672-0.55]

CUDA graphs over weight copies larger than L2, median µs per call; writes
benchmarks/results/bitserial_chain.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # layer_kernels.py
sys.path.insert(0, str(Path(__file__).parent))
from layer_kernels import import_kernel, n_copies, packed_bytes, random_layer, rank_for_bpw, time_graph  # noqa: E402


def chain(bs, tk, x, layer, ws, t, steps: str, pdl: bool = True, cnt=None) -> None:
    """The bit-serial call's kernels named in ``steps`` (q: planes of x * g, 1: stage 1, t: planes of t,
    2: stage 2; p: the Triton stage 1 ending in the planes of t; f: the bit-serial stage 1 making the
    planes of t itself, with counters ``cnt``; stage 2 reads what they wrote), on the
    call's own buffers."""
    u, v, h, l, g = layer
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    t_len = 32 * W_r
    n_x = -(-bs.workspace_floats(P, W_in) // 4) * 4
    x_planes, t_planes = ws[:n_x], ws[n_x:]
    cfg = tk.KernelConfig()
    if "q" in steps:
        bs.quantize(x, x_planes, x.shape[1], W_in, P, pdl, 0, g)
    if "1" in steps:
        bs.gemv(x_planes, v, l, None, t, W_in, 1, P, tk._bit_tile1(cfg), pdl, t_len)
    if "t" in steps:
        bs.quantize(t, t_planes, r, W_r, P, pdl, t_len)
    if "f" in steps:
        fused = bs.SelfQuantizing(cnt, t_planes)
        bs.gemv(x_planes, v, l, None, t, W_in, 1, P, tk._bit_tile1(cfg), pdl, t_len, fused)
    if "p" in steps:
        t_planes = tk._stage1_to_planes(x, v, l, g, tk.KernelConfig(pdl=pdl), tk._num_sms(0))
    if "2" in steps:
        y = torch.empty(1, d_out, dtype=x.dtype, device=x.device)
        bs.gemv(t_planes, u, h, None, y, W_r, P, 1, tk._bit_tile(d_out, W_r, 1, cfg, 132), pdl)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8192-28672-1.0,8192-28672-0.55,28672-8192-1.0")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bitserial_chain.json"))
    args = ap.parse_args()
    bs, tk = import_kernel("cuda_bitserial"), import_kernel("triton_littlebit")
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for case in args.cases.split(","):
        d_in, d_out, bpw = int(case.split("-")[0]), int(case.split("-")[1]), float(case.split("-")[2])
        r = rank_for_bpw(d_in, d_out, bpw)
        g = (torch.rand(2, d_in, generator=gen, device="cuda") + 0.5).half()
        layers = [
            (*random_layer(d_in, d_out, r, "cuda", gen), g)
            for _ in range(n_copies(packed_bytes(d_in, d_out, r)))
        ]
        x = torch.randn(1, d_in, generator=gen, device="cuda").half()
        W_r, W_in = math.ceil(r / 32), math.ceil(d_in / 32)
        ws = torch.zeros(bs.workspace_floats(2, W_in) + 4 + bs.workspace_floats(2, W_r), device="cuda")
        t = torch.zeros(2 * 32 * W_r, device="cuda")
        chain(bs, tk, x, layers[0], ws, t, "q1t")  # real planes and t for the pieces timed alone
        rec = dict(d_in=d_in, d_out=d_out, bpw=bpw, rank=r, device=torch.cuda.get_device_name())
        K = tk.KernelConfig
        configs = {"default": K(), "triton-stage1": K(stage1_bitserial=False),
                   "bitserial-stage1": K(stage1_bitserial=True),
                   "bitserial-stage1-launches": K(stage1_bitserial=True, quantize_in_stage1=False),
                   "triton-stage1-t": K(stage1_bitserial=False, quantize_in_stage1=False),
                   "fp16-mma": K(stage2_bitserial=False)}  # fmt: skip
        for name, cfg in configs.items():
            fn = functools.partial(tk.littlebit_linear_triton, config=cfg)
            rec[f"us_call_{name}"] = round(time_graph([functools.partial(fn, x, *c) for c in layers], 20), 2)
        cnt = torch.zeros(bs.counters_needed(2, r), dtype=torch.int32, device="cuda")
        for steps in "q 1 t 2 q1 q1t 1t2 t2 q1t2 p p2 qf qf2".split():
            for pdl in (True, False):
                calls = [functools.partial(chain, bs, tk, x, c, ws, t, steps, pdl, cnt) for c in layers]
                rec[f"us_{steps}{'' if pdl else '_nopdl'}"] = round(time_graph(calls, 20), 2)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
