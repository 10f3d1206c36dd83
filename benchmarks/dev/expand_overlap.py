"""Can the GEMM path hide its expansion behind the previous layer's GEMMs? Batch-256 decoding of the
Llama-2-7B shape at 0.55 BPW is slower than FP16 because each packed call writes its factors to memory
before its two GEMMs (docs/kernels.md, "Many tokens"). The expansion of the next layer does not depend
on this layer's output, so it could run on a second stream while this layer's GEMMs run.

For one decoder layer's linears (q, k, v, o, gate, up, down), ``--blocks`` times over, at ``--tokens``
tokens a call, bf16, each schedule recorded as one CUDA graph and replayed (median µs):

- ``dense``: cuBLAS on dense bf16 weights;
- ``packed``: littlebit's op, as the model runs it (the GEMM path from 128 tokens);
- ``gemms``: the two GEMMs a call on factors expanded beforehand (the floor for any expansion schedule);
- ``expand``: the expansions alone;
- ``overlapped``: the same expansions and GEMMs, the expansion of call i + 1 on a second stream while
  call i's GEMMs run (two sets of factor buffers, each reused once the GEMMs reading it are done).

The overlapped schedule's outputs are checked against the packed op's. For each distinct layer, one
call's parts are timed alone too (``stages``: dense, the packed op, each factor's expansion, each GEMM).
Prints one line per case and writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/expand_overlap.py                  # GPU: about two minutes
    TRITON_INTERPRET=1 python benchmarks/dev/expand_overlap.py --smoke --name expand_overlap_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from prefill import LAYERS, SMOKE_LAYERS, gpu_us, random_layer  # noqa: E402

# one decoder layer of the 7B shape: q, k, v, o, gate, up, down
DECODER = ["7b-qo"] * 4 + ["7b-up"] * 2 + ["7b-down"]
SMOKE_DECODER = ["smoke-a", "smoke-b", "smoke-a"]


class Schedules:
    """The calls of ``blocks`` decoder layers and the buffers each schedule writes into."""

    def __init__(self, names: list[str], bpw: float, tokens: int, device: str) -> None:
        shapes = {**LAYERS, **SMOKE_LAYERS}
        self.device = device
        self.layers = [random_layer(*shapes[n], bpw, device, seed=i) for i, n in enumerate(names)]
        dims = [shapes[n] for n in names]
        inputs = {d_in: torch.randn(tokens, d_in, device=device).bfloat16() for d_in, _ in dims}
        self.x = [inputs[d_in] for d_in, _ in dims]
        self.y = [torch.empty(tokens, d_out, device=device, dtype=torch.bfloat16) for _, d_out in dims]
        self.dense = [torch.randn(o, i, device=device).bfloat16() / i**0.5 for i, o in dims]
        self.pre = [self.factors_of(layer) for layer in self.layers]  # for ``gemms``
        self.packed_y: list[torch.Tensor] = []
        # two sets of buffers, each factor's as large as the largest layer's
        sizes = [max(f[k].numel() for f in self.pre) for k in (0, 1)]
        self.buffers = [
            [torch.empty(n, device=device, dtype=torch.bfloat16) for n in sizes] for _ in range(2)
        ]
        self.side = torch.cuda.Stream() if device == "cuda" else None

    def factors_of(self, layer):
        from littlebit.kernels.gpu.gemm import expanded_factors

        return expanded_factors(*layer, dtype=torch.bfloat16)

    def expand_into(self, i: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's factors written into buffer set ``slot``."""
        from littlebit.kernels.gpu.gemm import expanded_factors

        return expanded_factors(*self.layers[i], dtype=torch.bfloat16, out=self.buffers[slot])

    def run_dense(self) -> None:
        for x, w, y in zip(self.x, self.dense, self.y, strict=True):
            torch.mm(x, w.T, out=y)

    def run_packed(self) -> None:
        """The op's own outputs, kept (a copy into ``y`` would add a kernel a call the others do not have)."""
        from littlebit.kernels.gpu import triton_littlebit as tk

        pairs = zip(self.x, self.layers, strict=True)
        self.packed_y = [tk.littlebit_linear_triton(x, *layer) for x, layer in pairs]

    def run_gemms(self) -> None:
        for x, (a, b), y in zip(self.x, self.pre, self.y, strict=True):
            torch.mm(torch.mm(x, a.T), b.T, out=y)

    def run_expand(self) -> None:
        for i in range(len(self.layers)):
            self.expand_into(i, i % 2)

    def run_overlapped(self) -> None:
        """Call i's GEMMs on the current stream, call i + 1's expansion on the side stream."""
        n = len(self.layers)
        main = torch.cuda.current_stream() if self.side is not None else None
        ready, done = [None] * n, [None] * n

        def expand(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
                if self.side is not None and i >= 2:
                    self.side.wait_event(done[i - 2])  # the set it reuses is read by call i - 2's GEMMs
                factors = self.expand_into(i, i % 2)
                if self.side is not None:
                    ready[i] = torch.cuda.Event()
                    ready[i].record(self.side)
            return factors

        if self.side is not None:
            self.side.wait_stream(main)  # the graph's capture forks here
        pending = expand(0)
        for i in range(n):
            a, b = pending
            if i + 1 < n:
                pending = expand(i + 1)
            if self.side is not None:
                main.wait_event(ready[i])
            torch.mm(torch.mm(self.x[i], a.T), b.T, out=self.y[i])
            if self.side is not None:
                done[i] = torch.cuda.Event()
                done[i].record(main)
        if self.side is not None:
            main.wait_stream(self.side)  # and joins here


def stage_times(s: Schedules, names: list[str], device: str) -> list[dict]:
    """µs of each part of one call, for each distinct layer: where a packed call's time goes."""
    out = []
    for name in dict.fromkeys(names):
        i = names.index(name)
        rec = {"layer": name, "rank": s.layers[i][3].shape[-1], "paths": s.layers[i][0].shape[0]}
        for part, fn in call_parts(s.x[i], s.dense[i], s.layers[i], *s.pre[i]).items():
            rec[f"{part}_us"] = gpu_us(fn, device)
        out.append(rec)
    return out


def call_parts(x, dense, layer, a, b) -> dict:
    from littlebit.kernels.gpu import triton_littlebit as tk
    from littlebit.kernels.gpu.gemm import _expand

    u, v, h, l, g = layer
    r, d_in = l.shape[-1], g.shape[-1]
    t = torch.mm(x, a.T)
    return {
        "dense": lambda: torch.mm(x, dense.T),
        "packed": lambda: tk.littlebit_linear_triton(x, u, v, h, l, g),
        "expand_a": lambda: _expand(v, l, g, a, d_in, r, 0),
        "expand_b": lambda: _expand(u, h, None, b, r, 0, r),
        "gemm_1": lambda: torch.mm(x, a.T),
        "gemm_2": lambda: torch.mm(t, b.T),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", default="0.55,0.1,1.0")
    ap.add_argument("--tokens", default="256,64")
    ap.add_argument("--blocks", type=int, default=2, help="decoder layers in a row")
    ap.add_argument("--smoke", action="store_true", help="tiny layers (CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--name", default="expand_overlap")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    names = (SMOKE_DECODER if args.smoke else DECODER) * args.blocks
    records = []
    for bpw in (float(b) for b in args.bpw.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            s = Schedules(names, bpw, tokens, device)
            s.run_packed()
            want = [y.float() for y in s.packed_y]
            s.run_overlapped()
            err = max(((y.float() - w).norm() / w.norm()).item() for y, w in zip(s.y, want, strict=True))
            rec = {"bpw": bpw, "tokens": tokens, "calls": len(names), "overlapped_rel_err": err}
            for what in ("dense", "packed", "gemms", "expand", "overlapped"):
                rec[f"{what}_us"] = gpu_us(getattr(s, f"run_{what}"), device)
            for what in ("packed", "gemms", "overlapped"):
                rec[f"{what}_vs_dense"] = rec["dense_us"] / rec[f"{what}_us"]
            rec["stages"] = stage_times(s, names, device)
            records.append(rec)
            for st in rec["stages"]:
                print("   ", {k: round(v, 2) if isinstance(v, float) else v for k, v in st.items()})
            print(
                f"{bpw:5} BPW {tokens:4} tokens, {len(names)} calls: dense {rec['dense_us']:8.1f}  packed "
                f"{rec['packed_us']:8.1f}  gemms {rec['gemms_us']:8.1f}  expand {rec['expand_us']:8.1f}  "
                f"overlapped {rec['overlapped_us']:8.1f} µs ({rec['overlapped_vs_dense']:.2f}x dense); "
                f"rel err {err:.1e}",
                flush=True,
            )
            del s
            if device == "cuda":
                torch.cuda.empty_cache()
    print(common.write_results(args.name, records, blocks=args.blocks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
