"""Exact vs randomized truncated SVD inside the initialisation: reconstruction error and time.

On Llama-2-7B-shaped matrices (a decaying low-rank part plus noise, as in ``synthetic_checkpoint``)
at several bit budgets, runs Dual-SVID and Joint-ITQ once with the exact SVD and once with the
randomized route (the range finder with the Gram-based rank-1 scale fits it switches on), and
reports the initial relative error ``|W - W_hat|_F / |W|_F`` of both, the
relative gap between them and the wall time of each.

    python benchmarks/init_svd.py --threads 2
    python benchmarks/init_svd.py --threads 2 --power-iterations 1 --bpw 0.55 --no-write
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from common import write_results
from synthetic_checkpoint import spectral_matrix

if TYPE_CHECKING:
    import torch

SHAPES = ((4096, 4096), (4096, 11008))  # d_out x d_in: attention projections, down_proj


@contextmanager
def svd_route(randomized: bool, oversampling: int, power_iterations: int) -> Iterator[None]:
    """Force every truncated SVD down one route, whatever the size rule would pick."""
    import littlebit.core.init as init

    saved = {n: getattr(init, n) for n in ("EXACT_SVD_MAX_DIM", "RANDOMIZED_MAX_RANK_FRACTION")}
    saved |= {"OVERSAMPLING": init.OVERSAMPLING, "POWER_ITERATIONS": init.POWER_ITERATIONS}
    init.EXACT_SVD_MAX_DIM = 0 if randomized else 10**9
    init.RANDOMIZED_MAX_RANK_FRACTION = 1.0
    init.OVERSAMPLING, init.POWER_ITERATIONS = oversampling, power_iterations
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(init, name, value)


def measure(
    w: torch.Tensor, rank: int, method: str, randomized: bool, a: argparse.Namespace
) -> tuple[float, float]:
    from littlebit.core.init import initialise

    with svd_route(randomized, a.oversampling, a.power_iterations):
        t0 = time.perf_counter()
        factors = initialise(w, rank, method=method)
        seconds = time.perf_counter() - t0
    error = ((factors.weight() - w).norm() / w.norm()).item()
    return error, seconds


def main() -> None:
    import torch

    import littlebit.core.init as init
    from littlebit.core.budget import rank_for_bpw

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bpw", type=float, nargs="+", default=[0.1, 0.55, 1.0])
    p.add_argument("--methods", nargs="+", default=["dual-svid", "itq"])
    itq_help = "skip Joint-ITQ above this (its r x r Procrustes SVDs dominate there, not the init SVD)"
    p.add_argument("--itq-max-bpw", type=float, default=0.55, help=itq_help)
    p.add_argument("--oversampling", type=int, default=init.OVERSAMPLING)
    p.add_argument("--power-iterations", type=int, default=init.POWER_ITERATIONS)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    records = []
    print(f"{'shape':>11} {'bpw':>5} {'rank':>5} {'method':>9} {'err exact':>10} {'err rand':>10} "
          f"{'gap %':>7} {'exact s':>8} {'rand s':>7} {'rule':>5}")  # fmt: skip
    for d_out, d_in in SHAPES:
        w = spectral_matrix(d_out, d_in, torch.Generator().manual_seed(0))
        for bpw in a.bpw:
            rank = rank_for_bpw(d_in, d_out, bpw, residual=True)
            for method in a.methods:
                if method == "itq" and bpw > a.itq_max_bpw:
                    continue
                e_exact, t_exact = measure(w, rank, method, False, a)
                e_rand, t_rand = measure(w, rank, method, True, a)
                gap = 100 * (e_rand - e_exact) / e_exact
                rule = "rand" if init.use_randomized_svd((d_out, d_in), rank) else "exact"
                records.append({"d_out": d_out, "d_in": d_in, "bpw": bpw, "rank": rank, "method": method,
                                "error_exact": e_exact, "error_randomized": e_rand, "gap_percent": gap,
                                "exact_s": t_exact, "randomized_s": t_rand, "rule_picks": rule})  # fmt: skip
                print(f"{d_out:>5}x{d_in:<5} {bpw:>5} {rank:>5} {method:>9} {e_exact:>10.5f} {e_rand:>10.5f} "
                      f"{gap:>7.3f} {t_exact:>8.1f} {t_rand:>7.1f} {rule:>5}", flush=True)  # fmt: skip
    if not a.no_write:
        meta = {"threads": a.threads, "oversampling": a.oversampling, "power_iterations": a.power_iterations}
        print("wrote", write_results("init_svd_cpu", records, **meta))


if __name__ == "__main__":
    main()
