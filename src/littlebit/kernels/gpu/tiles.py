"""Tile rules of the GPU kernels: how each kernel cuts a layer of a given shape into programs.

Every rule is a function of the layer's shape, the SM count and ``KernelConfig`` (whose nonzero tile
fields override the rule). The thresholds are empirical, from H100 sweeps (docs/kernels.md has the
numbers). P: paths, W_in / W_r: words of a row of S_V^T / S_U (d_in / 32, r / 32), "many rows":
more than 4 programs of 16 rows per SM.

| kernel (function)                       | rule (an override in ``KernelConfig`` wins)                   |
|-----------------------------------------|---------------------------------------------------------------|
| GEMV stage 1, Triton                    | lanes along d_in (widest step up to ``words_v`` words with    |
| (``_stage1_geometry``)                  | few masked lanes), ``rows_v`` rows a thread; d_in split until |
|                                         | the grid holds ``waves`` programs per SM                      |
| GEMV stage 2, Triton (``_stage2_tile``) | a whole row (up to 32 words) a step, ``rows_u`` rows a        |
|                                         | thread; blocks halve under 2 waves, and such small layers     |
|                                         | with rows over 16 words take ``rows_u_small`` rows a thread   |
| tensor cores, Triton (``_tc_tile``)     | 64 rows x 2 words a step for ranks under 1024, else 128 x 4;  |
|                                         | d_in split to ``tc_waves``; output blocks halve to fill them  |
| stage 2 on fp16 MMAs (``_mma_tile``)    | rows of 17+ words, not many rows: 1 tile, 2 words, 8 warps;   |
|                                         | up to 6 units of 4 words: 4 tiles, 1 word, 4 warps;           |
|                                         | else 2 tiles (many rows) or 4, 1 word, 8 warps                |
| stage 2 bit-serial (``_bit_tile``)      | many rows: 2 tiles a warp, 2 warps a row group, 2 groups, 4   |
|                                         | units in flight; else 1, 4, 2, 2                              |
| stage 1 bit-serial (``_bit_tile1``)     | 1 tile a warp, 8 warps a row group, 1 group, 4 in flight      |
"""

from __future__ import annotations

from littlebit.kernels.gpu import cuda_bitserial, cuda_mma
from littlebit.kernels.gpu.config import KernelConfig


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers. ``triton.cdiv`` does the same through Triton's constexpr
    wrapper, several µs a call on the host, and a call of a packed layer makes a dozen of them."""
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _words_per_step(w: int, widest: int = 32) -> int:
    """A power-of-two step over ``w`` words that leaves few masked lanes, the widest among near-ties."""
    best, best_eff = 1, 0.0
    step = 1
    while step <= widest:
        eff = w / (cdiv(w, step) * step)
        if eff > best_eff + 0.1 or (eff >= best_eff - 0.1 and step > best):
            best, best_eff = step, max(eff, best_eff)
        step *= 2
    return best


def _split(n_words: int, step: int, programs: int, target: int) -> tuple[int, int]:
    """Split ``n_words`` in chunks (multiples of ``step``) so that ``programs`` per chunk reach ``target``."""
    n_steps = cdiv(n_words, step)
    want = max(1, min(n_steps, cdiv(target, max(programs, 1))))
    chunk = cdiv(n_steps, want) * step
    return chunk, cdiv(n_words, chunk)


def _row_tile(rows: int, words: int, per_thread: int, warps: int) -> tuple[int, int]:
    """(rows per program, warps) for a tile whose lanes cover ``words`` columns, then rows."""
    lanes_on_rows = 32 // words
    block = per_thread * lanes_on_rows * warps
    while block > max(rows, lanes_on_rows) and warps > 1:  # small layers: fewer warps, not idle rows
        warps //= 2
        block //= 2
    return block, warps


def _stage2_tile(
    d_out: int, W_r: int, groups: int, cfg: KernelConfig, sms: int, reduce: bool = False
) -> tuple[int, int, int]:
    """GEMV stage 2: (words per step, output rows per program, warps).

    Lanes go along r, then output rows. Covering a row in one step beat narrower, less wasteful steps
    in the sweep (more, shorter programs). Blocks shrink while the grid is under 2 waves; such small
    layers then take one warp per ``rows_u_small`` rows a thread, so each t value a thread loads serves
    more rows (those programs wait on their loads, not on arithmetic). Only for rows of more than 16
    words, where it won on the H100 (4096x4096 at 0.55 and 0.8 BPW: 1.08x, 1.11x; shorter rows were
    level or up to 2 % slower), and not after a partial-sums stage 1 (``reduce``; 1.4x slower there).
    """
    b2 = cfg.words_u or min(32, _pow2_at_least(W_r))
    lanes_on_rows = 32 // b2
    bo, warps = _row_tile(d_out, b2, cfg.rows_u, cfg.warps)
    small = False
    while bo > lanes_on_rows and groups * cdiv(d_out, bo) < 2 * sms:
        small = True
        bo //= 2
        warps = max(1, warps // 2) if bo < cfg.rows_u * lanes_on_rows * warps else warps
    if small and not reduce and W_r > 16 and cfg.rows_u_small > cfg.rows_u:
        fewer = max(1, min(warps, bo // (cfg.rows_u_small * lanes_on_rows)))
        warps = 1 << (fewer.bit_length() - 1)  # a power of two, whatever rows_u_small is
    return b2, bo, warps


def _mma_tile(d_out: int, W_r: int, P: int, groups: int, cfg: KernelConfig, sms: int) -> cuda_mma.MmaTile:
    # Thresholds are empirical, from an H100 grid of tiles on the 30 batch-1 layers of
    # benchmarks/layer_kernels.py (benchmarks/results/kernels_mma_tiles.json; geometric mean 1.7 % over
    # the best of 9 configurations, worst 8192x8192 at 0.3 BPW, 8.43 against 7.62 µs). One word a thread per
    # unit won on most layers. Rows of at most 12 words (6 units of 4 words over 2 paths) did best with
    # 4 warps on 4 tiles (8192x28672 at 0.1 BPW: 8.7 -> 7.8 µs); 16-row programs taking 2 words a
    # thread won where d_out is small and rows long (the 4096x4096 and 28672x8192 layers from 0.55 BPW).
    many_rows = groups * cdiv(d_out, 16) > 4 * sms
    units = P * cdiv(W_r, 4)
    if not many_rows and W_r >= 17:
        mt, wpt, warps = 1, 2, 8
    elif units <= 6:
        mt, wpt, warps = 4, 1, 4
    else:
        mt, wpt, warps = (2 if many_rows else 4), 1, 8
    return cuda_mma.MmaTile(cfg.mma_rows or mt, cfg.mma_words or wpt, cfg.mma_warps or warps)


def _bit_tile(
    d_out: int, W_r: int, groups: int, cfg: KernelConfig, sms: int, u_tiled: bool = False
) -> cuda_bitserial.BitTile:
    # best tiles of bitserial_stage2.json for both row counts
    many_rows = groups * cdiv(d_out, 16) > 4 * sms
    mt, ks, rg, depth = (2, 2, 2, 4) if many_rows else (1, 4, 2, 2)
    return cuda_bitserial.BitTile(
        cfg.bits_rows or mt, cfg.bits_split or ks, cfg.bits_groups or rg, cfg.bits_depth or depth, u_tiled
    )


def _bit_tile1(cfg: KernelConfig) -> cuda_bitserial.BitTile:
    mt, ks, rg, depth = 1, 8, 1, 4  # best of 9 on 8192x28672 at 1.0 BPW (kernels_bitserial_stage1_tiles.json)
    return cuda_bitserial.BitTile(
        cfg.bits1_rows or mt, cfg.bits1_split or ks, cfg.bits1_groups or rg, cfg.bits1_depth or depth
    )


def _align4(n: int) -> int:
    return -(-n // 4) * 4


def _stage1_geometry(W_in: int, r: int, P: int, cfg: KernelConfig, sms: int) -> tuple[int, ...]:
    """GEMV stage 1's tiles: (words per step, rows per program, warps, row blocks, words per split,
    splits); lanes along d_in, ``rows_v`` rows per thread, d_in split until the grid fills ``waves``."""
    b1 = _words_per_step(W_in, cfg.words_v)
    br, warps1 = _row_tile(r, b1, cfg.rows_v, cfg.warps)
    n_rb = cdiv(r, br)
    chunk, n_split = _split(W_in, b1, P * n_rb, int(cfg.waves * sms))
    return b1, br, warps1, n_rb, chunk, n_split


def _tc_tile(M: int, r: int, W_in: int, d_out: int, P: int, cfg: KernelConfig, sms: int) -> tuple[int, ...]:
    """Tensor-core tiles: (tokens per program, token blocks, rows per program, words per step, words
    per split, splits, output rows per stage-2 program)."""
    bm = min(64, max(16, _pow2_at_least(M)))
    n_mb = cdiv(M, bm)
    rows = cfg.tc_rows or (64 if r < 1024 else 128)
    words = cfg.tc_words or (2 if rows <= 64 else 4)
    target = int(cfg.tc_waves * sms)
    n_rb = cdiv(r, rows)
    chunk, n_split = _split(W_in, words, P * n_rb * n_mb, target)
    bo = rows
    while bo > 16 and cdiv(d_out, bo) * n_mb < target:
        bo //= 2
    return bm, n_mb, rows, words, chunk, n_split, bo
