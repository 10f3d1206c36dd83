"""The packed LittleBit product on the GPU with Triton (math and layout: ``littlebit.ops``, ``.packing``).

Signs are read as packed words and decoded in registers; no unpacked matrix ever reaches memory. Up to
``KernelConfig.gemv_max_tokens`` tokens go through the GEMV kernels (``_gemv``), more through the
tensor-core kernels (``_tensorcore``). A call has two stages: stage 1 (t = l * S_V^T (g*x), g*x built
from x and g in the kernel, split over d_in with fp32 atomics so small ranks still fill the GPU) and
stage 2 (y = sum_p h_p * S_U,p t_p + bias). By default they are two launches, with ``t`` in a cached
workspace that is all zero between calls, zeroed again by the last stage-2 program; for ranks of 1024
and more the GEMV's stage 1 instead sums per-split partials in its last program per row block and
writes ``t`` whole (``KernelConfig.gemv_reduce``), as fp16 pairs when stage 2 decodes fp16; on sm_90+ both
use programmatic dependent launch (``KernelConfig.pdl``, ``_sync``), so each is scheduled while the
kernel before it still runs.
``KernelConfig(single_launch=True, tc_single_launch=True)`` runs both stages in one launch instead
(``_sync``: stage-2 programs wait on a grid-wide count of finished stage-1 programs, by ticket order,
without assuming co-residency; ``t`` double-buffered, its dirty half cleared in slices by the stage-2
programs). It saves a launch but was slower on the H100 (benchmarks/KERNELS_NOTES.md): one kernel
holds the registers of the heavier stage, so stage 2 runs at lower occupancy.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops import group_layer
from ..packing import untile_order
from . import cuda_bitserial, cuda_mma
from ._gemv import _gemv_kernel, _gemv_u_kernel, _gemv_v_kernel
from ._sync import HAS_PDL, N_STATE
from ._tensorcore import _tc_kernel, _tc_u_kernel, _tc_v_kernel

MAX_TOKENS = 64


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes; the defaults come from the H100 sweep in benchmarks/KERNELS_NOTES.md."""

    rows_v: int = 8  # GEMV stage 1: rows of S_V^T per thread (a thread owns one word column)
    words_v: int = 32  # GEMV stage 1: widest step over d_in, in words (lanes along the row)
    rows_u: int = 4  # GEMV stage 2: output rows per thread
    # GEMV stage 2 on layers too small to fill 2 waves (rows over 16 words): rows per thread, with
    # fewer warps per program rather than fewer programs (4096x4096 at 0.55 BPW on the H100: 8.3 -> 7.7
    # µs at 8 against 4)
    rows_u_small: int = 8
    words_u: int = 0  # GEMV stage 2: step over r in words; 0: the whole row up to 32 words
    warps: int = 4
    waves: float = 8.0  # GEMV: programs per SM aimed for when splitting d_in
    tc_rows: int = 0  # tensor cores: rows per program; 0: 64 for ranks under 1024, else 128
    tc_words: int = 0  # tensor cores: words per step; 0: 2 with 64 rows, else 4
    tc_warps: int = 4
    tc_waves: float = 2.0
    asm: bool | None = None  # fp16x2 decoding in the GEMV; None: for fp16 on a GPU
    gemv_max_tokens: int = 1  # more tokens take the tensor-core path
    single_launch: bool = False  # GEMV: both stages in one launch (slower on the H100 so far, see notes)
    tc_single_launch: bool = False  # tensor cores: the same (slower on the H100 so far: 60 against 51 µs)
    t_cg: bool = False  # single launch: stage 2 reads t with ld.global.cg (L2 only; slower on the H100)
    spin_ns: int = 200  # single launch: nanosleep per poll of a waiting program (0: busy polling)
    tc_maxnreg: int = 0  # single-launch tensor-core kernel: register cap per thread (0: the compiler's)
    gemv_maxnreg: int = 0  # single-launch GEMV kernel: the same
    # two launches: programmatic dependent launch, so stage 2 (and the next layer's stage 1) is scheduled
    # while the previous kernel runs (``_sync``); None: on sm_90+ GPUs when Triton has it
    pdl: bool | None = None
    # two-launch GEMV: stage 1 stores per-split partial sums and the last program of each row block adds
    # them into t (fixed order: deterministic; fp16x2 pairs for stage 2 when it can), instead of atomics
    # into a zero t that the last stage-2 program clears after a ticket every stage-2 program takes on
    # one address. None: for ranks of 1024 and more (32-word rows), where it won on the H100 (8192x28672
    # at 1.0 BPW 42.5 -> 33.7 µs); on small layers its longer stage-1 tail cost as much as it saved.
    gemv_reduce: bool | None = None
    # two-launch GEMV: the tickets that find the last program (stage 2's before clearing t, stage 1's
    # before summing partials) only release, and the last one acquires after, instead of acq_rel in
    # every program (each acquire invalidates L1 on sm_90); level on the H100 (within 0.1 µs), so off
    release_tickets: bool = False
    # batch-1 GEMV: stage 2 on tensor cores (``cuda_mma``, CUDA C++ through NVRTC; fp16, sm_80+), stage 1
    # then writes t as fp16 pairs, a word's 16 contiguous. None: where NVRTC and the GPU allow it, for
    # S_U sizes where it won on the H100 (``_MMA_WORDS``; 4096x4096 at 0.55 BPW 7.7 -> 6.3 µs)
    stage2_mma: bool | None = None
    mma_rows: int = 0  # 16-row tiles per program; 0: chosen by shape (``_mma_tile``)
    mma_words: int = 0  # words a thread per unit (unit = 4 * mma_words words of one path's rows); 0: by shape
    mma_warps: int = 0  # warps per program sharing its units; 0: by shape
    mma_stage: bool | None = None  # copy a program's sign words to shared memory first; None: no (slower)
    # batch-1 GEMV: stage 2 as bit-serial binary MMAs (``cuda_bitserial``: t quantized per 256 entries
    # to 16 bit planes by a small kernel between the stages, sign words used as they are). None: where
    # NVRTC and the GPU allow it, for S_U of at least ``_BITSERIAL_WORDS`` words per path. Takes
    # precedence over ``stage2_mma``.
    stage2_bitserial: bool | None = None
    bits_rows: int = 0  # 16-row tiles per warp; 0: by shape (``_bit_tile``)
    bits_split: int = 0  # warps splitting the units of the same rows; 0: by shape
    bits_groups: int = 0  # such row groups per program; 0: by shape
    bits_depth: int = 0  # units a warp has in flight; 0: by shape
    bits_stage: bool | None = None  # copy a program's sign rows to shared memory first; None: no (slower)
    # with the bit-serial stage 2: stage 1 bit-serial as well (x * g quantized to bit planes per path,
    # S_V^T rows as the MMA rows, every path a group), four launches with no Triton kernel. None: for
    # inputs of at least ``_BITSERIAL_STAGE1_WORDS`` words.
    stage1_bitserial: bool | None = None
    # with the bit-serial stage 2: stage 1 quantizes t for it (the last program per block of 256 rows
    # makes that block's planes) instead of a launch in between. None: where the programs' rows tile
    # those blocks (``_stage1_to_planes``, ``cuda_bitserial.quantizes_output``).
    quantize_in_stage1: bool | None = None
    # the bit-serial stage 1 quantizes x * g too (its first programs, the others waiting for them)
    # instead of a launch before it: slower on the H100 (8192x28672 at 1.0 BPW 20.7 -> 21.8 µs)
    stage1_quantizes_x: bool = False
    # batch 1, bit-serial stage 2: the stage 1 before it lets it be scheduled from its start (PDL), so
    # that stage 2's programs, where they fit beside stage 1's, load their sign rows during stage 1
    stage2_early: bool = False
    bits1_rows: int = 0  # the bit-serial stage 1's tile (``_bit_tile1``); 0: its default
    bits1_split: int = 0
    bits1_groups: int = 0
    bits1_depth: int = 0


DEFAULT_CONFIG = KernelConfig()
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _words_per_step(w: int, widest: int = 32) -> int:
    """A power-of-two step over ``w`` words that leaves few masked lanes, the widest among near-ties."""
    best, best_eff = 1, 0.0
    step = 1
    while step <= widest:
        eff = w / (triton.cdiv(w, step) * step)
        if eff > best_eff + 0.1 or (eff >= best_eff - 0.1 and step > best):
            best, best_eff = step, max(eff, best_eff)
        step *= 2
    return best


def _split(n_words: int, step: int, programs: int, target: int) -> tuple[int, int]:
    """Split ``n_words`` in chunks (multiples of ``step``) so that ``programs`` per chunk reach ``target``."""
    n_steps = triton.cdiv(n_words, step)
    want = max(1, min(n_steps, triton.cdiv(target, max(programs, 1))))
    chunk = triton.cdiv(n_steps, want) * step
    return chunk, triton.cdiv(n_words, chunk)


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
    while bo > lanes_on_rows and groups * triton.cdiv(d_out, bo) < 2 * sms:
        small = True
        bo //= 2
        warps = max(1, warps // 2) if bo < cfg.rows_u * lanes_on_rows * warps else warps
    if small and not reduce and W_r > 16 and cfg.rows_u_small > cfg.rows_u:
        fewer = max(1, min(warps, bo // (cfg.rows_u_small * lanes_on_rows)))
        warps = 1 << (fewer.bit_length() - 1)  # a power of two, whatever rows_u_small is
    return b2, bo, warps


_MAX_STAGED_BYTES = 200 * 1024  # shared memory a staged stage-2 program may take (H100: 227 KB a block)


def _mma_tile(d_out: int, W_r: int, P: int, groups: int, cfg: KernelConfig, sms: int) -> cuda_mma.MmaTile:
    # Thresholds are empirical, from an H100 grid of tiles on the 30 batch-1 layers of
    # benchmarks/kernels.py (benchmarks/results/grid_s9_tiles.json; geometric mean 1.7 % over the best
    # of 9 configurations, worst 8192x8192 at 0.3 BPW, 8.43 against 7.62 µs). One word a thread per
    # unit won on most layers. Rows of at most 12 words (6 units of 4 words over 2 paths) did best with
    # 4 warps on 4 tiles (8192x28672 at 0.1 BPW: 8.7 -> 7.8 µs); 16-row programs taking 2 words a
    # thread won where d_out is small and rows long (the 4096x4096 and 28672x8192 layers from 0.55 BPW).
    # Staging the words in shared memory was slower.
    many_rows = groups * triton.cdiv(d_out, 16) > 4 * sms
    units = P * triton.cdiv(W_r, 4)
    if not many_rows and W_r >= 17:
        mt, wpt, warps = 1, 2, 8
    elif units <= 6:
        mt, wpt, warps = 4, 1, 4
    else:
        mt, wpt, warps = (2 if many_rows else 4), 1, 8
    mt, wpt, warps = cfg.mma_rows or mt, cfg.mma_words or wpt, cfg.mma_warps or warps
    tile = cuda_mma.MmaTile(mt, wpt, warps, bool(cfg.mma_stage))
    if tile.stage and cuda_mma.staged_bytes(tile, P, W_r) > _MAX_STAGED_BYTES:
        tile = cuda_mma.MmaTile(tile.mt, tile.wpt, tile.warps, False)
    return tile


# Stage 2 on tensor cores by default for S_U of at least this many words per path (d_out * W_r).
# The eighth session set it where the partial-sums stage 1 the tensor-core stage 2 needs cost more
# than it saved; with the ninth session's tiles it wins below too on 5 of the 6 grid layers there
# (8192x8192 at 0.1 BPW 6.7 -> 5.4 µs; it loses on 11008x4096 at 0.1, 5.2 -> 5.6 µs), which is not yet
# acted on. The upper bound went with the tile rule: with one word a thread per unit the largest
# layers gain too (8192x28672 at 1.0 BPW 33.0 -> 30.9 µs in one process, grid_s9_tiles.json).
_MMA_WORDS = 64 * 1024


def _bit_tile(
    d_out: int, W_r: int, groups: int, cfg: KernelConfig, sms: int, P: int = 2, u_tiled: bool = False
) -> cuda_bitserial.BitTile:
    many_rows = groups * triton.cdiv(d_out, 16) > 4 * sms
    mt, ks, rg, depth = (2, 2, 2, 4) if many_rows else (1, 4, 2, 2)
    # tile order reads whole blocks in one load: nothing to stage (best tiles of
    # bitserial_stage2_frag.json for both row counts)
    stage = bool(cfg.bits_stage) and not u_tiled
    tile = cuda_bitserial.BitTile(
        cfg.bits_rows or mt,
        cfg.bits_split or ks,
        cfg.bits_groups or rg,
        cfg.bits_depth or depth,
        stage,
        u_tiled,
    )
    if tile.stage and cuda_bitserial.staged_bytes(tile, P, W_r) > _MAX_STAGED_BYTES:
        tile = cuda_bitserial.BitTile(tile.mt, tile.ks, tile.rg, tile.depth, False, u_tiled)
    return tile


def _bit_tile1(cfg: KernelConfig) -> cuda_bitserial.BitTile:
    mt, ks, rg, depth = 1, 8, 1, 4  # best of 9 on 8192x28672 at 1.0 BPW (kernels_acceptance_s10a.json)
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
    n_rb = triton.cdiv(r, br)
    chunk, n_split = _split(W_in, b1, P * n_rb, int(cfg.waves * sms))
    return b1, br, warps1, n_rb, chunk, n_split


def _stage1_to_planes(x2, v, l, g, cfg: KernelConfig, sms: int) -> torch.Tensor | None:
    """One token: the Triton stage 1 ending in the bit planes of t that the bit-serial stage 2 reads
    (``_gemv._reduce_to_planes``), with no t in between. Returns the workspace slice that holds them
    (``cuda_bitserial.split_workspace``), or None, launching nothing, where its row blocks do not
    tile blocks of 256 rows."""
    P, r, W_in = v.shape
    W_r = triton.cdiv(r, 32)
    b1, br, warps1, n_rb, chunk, n_split = _stage1_geometry(W_in, r, P, cfg, sms)
    if 256 % br:
        return None
    n_part = _align4(n_split * P * r)  # the bit planes after it stay 16-byte aligned
    ws = _workspace(x2.device, n_part + cuda_bitserial.workspace_floats(P, W_r), "reduce", P * n_rb)
    region = ws.t[n_part:]
    planes, scales = cuda_bitserial.split_workspace(region, P, W_r)
    ptx = x2.is_cuda and not _interpreting()
    _gemv_v_kernel[(P * n_rb, n_split)](
        x2, g, v, l, ws.t, ws.t, ws.t, ws.counter, 1, r, W_in, x2.shape[1], x2.stride(0), n_rb, chunk,
        32 * W_r, W_r,
        P=P, TOK=1, BR=br, B1=b1, MODE1=int(_asm(x2, cfg)), B2=1, MODE2=0, PTX=ptx,
        REDUCE=True, RELEASE_ONLY=cfg.release_tickets, planes_ptr=planes, scales_ptr=scales, QUANT=True,
        EARLY=cfg.stage2_early, num_warps=warps1, **_pdl_args(x2, cfg),
    )  # fmt: skip
    return region


def _gemv_bitserial(
    x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, groups: int, u_tiled: bool = False
) -> None:
    """Batch 1, both stages bit-serial (``cuda_bitserial``): planes of x * g, t = l * S_V^T (x * g),
    planes of t, y = sum_p h_p * S_U,p t_p. By default stage 1 makes the planes of t itself
    (``cuda_bitserial.SelfQuantizing``): three launches, each a PDL dependent of the one before."""
    d_in = x2.shape[1]
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    t_len = 32 * W_r
    n_t = _align4(P * t_len)
    n_x = _align4(cuda_bitserial.workspace_floats(P, W_in))
    n_floats = n_t + n_x + cuda_bitserial.workspace_floats(P, W_r)
    fuse = cfg.quantize_in_stage1 is not False
    if fuse or cfg.stage1_quantizes_x:  # its tickets must be zero between calls
        ws = _workspace(x2.device, n_floats, "reduce", cuda_bitserial.counters_needed(P, r))
    else:
        ws = _workspace(x2.device, n_floats, "bits")
    t, x_planes, t_planes = ws.t[:n_t], ws.t[n_t : n_t + n_x], ws.t[n_t + n_x :]
    pdl = _pdl(x2, cfg)
    tile1 = _bit_tile1(cfg)
    t_ws = t_planes if fuse and cuda_bitserial.quantizes_output(tile1) else None
    x_in = cfg.stage1_quantizes_x
    fused = None
    if t_ws is not None or x_in:
        fused = cuda_bitserial.SelfQuantizing(ws.counter, *((x2, g) if x_in else (None, None)), t_ws)
    if not x_in:
        cuda_bitserial.quantize(x2, x_planes, d_in, W_in, P, pdl, 0, g)
    early = cfg.stage2_early and t_ws is not None
    cuda_bitserial.gemv(x_planes, v, l, None, t, W_in, 1, P, tile1, pdl, t_len, fused, early)
    if t_ws is None:
        cuda_bitserial.quantize(t, t_planes, r, W_r, P, pdl, t_len)
    tile = _bit_tile(d_out, W_r, groups, cfg, sms, P // groups, u_tiled)
    cuda_bitserial.gemv(t_planes, u, h, bias, y, W_r, P // groups, groups, tile, pdl)


# Stage 2 as bit-serial MMAs by default for ranks of at least ``_BITSERIAL_RANK_WORDS`` words and S_U
# of at least ``_BITSERIAL_WORDS`` words per path (d_out * W_r). From the H100 runs of the tenth session
# (benchmarks/results/kernels_acceptance_s10.json, bitserial_chain.json): 8192x28672 at 1.0 BPW 31.4 ->
# 21.5 µs, at 0.55 20.3 -> 15.6, 28672x8192 at 1.0 30.5 -> 25.1; shorter rows lost (8192x28672 at
# 0.1 BPW, 10 words: 7.9 -> 8.3; 4096x4096 at 0.55, 17 words: 6.3 -> 6.9).
_BITSERIAL_WORDS = 64 * 1024
_BITSERIAL_RANK_WORDS = 32
# ... and stage 1 bit-serial too for inputs of at least this many words (28672x8192 at 1.0 BPW: 26.4 ->
# 25.1 µs); with d_in 8192 the fourth launch cost more than the bit-serial stage 1 saved (21.5 -> 22.2)
_BITSERIAL_STAGE1_WORDS = 512


def _use_bitserial(
    x2: torch.Tensor, h: torch.Tensor, bias, cfg: KernelConfig, words: int, W_r: int = _BITSERIAL_RANK_WORDS
) -> bool:
    """One token, fp16 or bf16, a GPU that has binary MMAs; by default only for S_U of at least
    ``_BITSERIAL_WORDS`` words per path and rows of at least ``_BITSERIAL_RANK_WORDS`` words."""
    want = cfg.stage2_bitserial
    if want is False or x2.shape[0] != 1 or cfg.single_launch:
        return False
    if want is None and (words < _BITSERIAL_WORDS or W_r < _BITSERIAL_RANK_WORDS):
        return False
    if h.dtype not in (torch.float16, torch.bfloat16) or (bias is not None and bias.dtype != h.dtype):
        return False
    return cuda_bitserial.available(x2.device.index or 0)


def _takes_tiled(x2: torch.Tensor, u: torch.Tensor, h, bias, cfg: KernelConfig) -> bool:
    """This one-token call's stage 2 is the bit-serial kernel, which reads tile-ordered signs."""
    P, d_out, W_r = u.shape
    ptx = x2.is_cuda and not _interpreting()
    return ptx and d_out % 16 == 0 and _use_bitserial(x2, h, bias, cfg, d_out * W_r, W_r)


def tile_order_pays(u_signs: torch.Tensor, dtype: torch.dtype, config: KernelConfig | None = None) -> bool:
    """Batch-1 calls of a layer with these S_U words (on their GPU, activations of ``dtype``) take the
    bit-serial stage 2, which reads them faster in tile order (``packing.tile_order``)."""
    x = torch.empty(1, 1, dtype=dtype, device=u_signs.device)
    h = torch.empty(1, u_signs.shape[1], dtype=dtype, device=u_signs.device)
    return _takes_tiled(x, u_signs, h, None, config or DEFAULT_CONFIG)


def _use_mma(
    x2: torch.Tensor, h: torch.Tensor, bias, cfg: KernelConfig, asm: bool, br: int, words: int = _MMA_WORDS
) -> bool:
    """Stage 2 on tensor cores: one token, fp16 throughout, whole-word stage-1 row blocks, a GPU that
    has it; by default only for S_U of at least ``_MMA_WORDS`` words per path."""
    want = cfg.stage2_mma
    if want is False or x2.shape[0] != 1 or not asm or br % 32 or cfg.single_launch:
        return False
    if want is None and words < _MMA_WORDS:
        return False
    if h.dtype != torch.float16 or (bias is not None and bias.dtype != torch.float16):
        return False
    return cuda_mma.available(x2.device.index or 0)


def _check(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor, h, l, g) -> None:
    if u_signs.dtype != torch.int32 or v_signs.dtype != torch.int32:
        raise TypeError("packed signs must be int32")
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    if x.shape[-1] != d_in or v_signs.shape != (P, r, triton.cdiv(d_in, 32)):
        raise ValueError(f"v_signs {tuple(v_signs.shape)} does not match d_in={d_in}, r={r}, P={P}")
    if u_signs.shape != (P, d_out, triton.cdiv(r, 32)):
        raise ValueError(f"u_signs {tuple(u_signs.shape)} does not match d_out={d_out}, r={r}, P={P}")


# Stage 1 adds into t with atomics, so t must be zero where a call adds. Instead of a launch that
# clears it, t is a persistent workspace. Two-launch path ("two"): kept all zero between calls, the last
# stage-2 program to finish zeroes the part it used and resets a ticket counter (``_gemv._release_t``).
# Single-launch path ("one"): two halves of ``cap`` floats and a state (``_sync``): one half zero, the
# other cleared in slices during the next call. Calls on one stream run one after the other, so one
# workspace per (device, stream, scheme) is enough.
_ZERO_BLOCK = 1024  # floats the zeroing program clears per step
_SLICE_BLOCK = 256  # floats a stage-2 program clears per step (its slice is small)


@dataclass
class _Workspace:
    t: torch.Tensor  # fp32; "two": all zero between calls; "one": halves [0, cap) and [cap, 2 cap);
    # "reduce": t then stage 1's partial sums, any values between calls
    counter: torch.Tensor  # int32; "two": (1,) zero between calls; "one": the ``_sync`` state;
    # "reduce": one ticket per stage-1 row block, zero between calls
    cap: int  # floats per call


_WORKSPACES: dict[tuple[torch.device, int | None, str], _Workspace] = {}
# Buffers replaced by larger ones are kept: a CUDA graph goes on using the addresses it captured.
_RETIRED: list[torch.Tensor] = []


def _new_workspace(
    device: torch.device, n: int, scheme: str, old: _Workspace | None, tickets: int
) -> _Workspace:
    cap = _pow2_at_least(max(n, 4096))
    if scheme == "reduce":
        # the tickets are zero between calls, so graphs captured with the old buffers can share them
        if old is not None and old.counter.numel() >= tickets:
            counter = old.counter
        else:
            counter = torch.zeros(_pow2_at_least(max(tickets, 256)), dtype=torch.int32, device=device)
        return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), counter, cap)
    if scheme == "bits":  # bit-serial calls: t and bit planes, rewritten whole by every call
        return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), torch.zeros(1), cap)
    if scheme == "two":
        # the counter is zero between calls, so graphs captured with the old buffer can share it
        counter = old.counter if old is not None else torch.zeros(1, dtype=torch.int32, device=device)
        return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), counter, cap)
    # the state (parity, dirty length) belongs to its buffer: a new one starts clean with its own
    state = torch.zeros(N_STATE, dtype=torch.int32, device=device)
    return _Workspace(torch.zeros(2 * cap, dtype=torch.float32, device=device), state, cap)


def _workspace(device: torch.device, n: int, scheme: str = "two", tickets: int = 1) -> _Workspace:
    """A workspace of at least ``n`` floats per call for the current stream.

    Calls captured into CUDA graphs share one workspace per device (key None): which stream a graph
    will be replayed on is not known at capture, and graphs are replayed one after the other in
    practice (two graphs replayed concurrently on different streams would race on it). Calls outside
    capture grow that workspace as well, so a capture that follows a warm-up of the same calls outside
    capture (benchmarks/kernels.py, benchmarks/decode.py) allocates nothing. Growing inside a capture
    still works: the zero fill becomes part of that graph.
    """
    if device.type != "cuda":
        keys = [(device, 0, scheme)]
    elif torch.cuda.is_current_stream_capturing():
        keys = [(device, None, scheme)]
    else:
        keys = [(device, torch.cuda.current_stream(device).cuda_stream, scheme), (device, None, scheme)]
    for key in keys:
        ws = _WORKSPACES.get(key)
        if ws is None or ws.cap < n or ws.counter.numel() < tickets:
            if ws is not None:
                _RETIRED.extend([ws.t, ws.counter])
            _WORKSPACES[key] = _new_workspace(device, max(n, ws.cap if ws else 0), scheme, ws, tickets)
    return _WORKSPACES[keys[0]]


@contextlib.contextmanager
def _zeroed_on_error(ws: _Workspace) -> Iterator[None]:
    """Keep the workspace zero if a launch fails after stage 1 went out (stage 2 will not clear it)."""
    try:
        yield
    except BaseException:
        # Ordered after stage 1 on the stream; during a capture it goes into the graph after stage 1.
        # A broken capture may refuse it: the original error is the one to report.
        with contextlib.suppress(Exception):
            ws.t.zero_()
            ws.counter.zero_()
        raise


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return HAS_PDL and torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl(x2: torch.Tensor, cfg: KernelConfig) -> bool:
    if not x2.is_cuda or _interpreting():
        return False
    return _pdl_capable(x2.device.index or 0) if cfg.pdl is None else cfg.pdl


def _pdl_args(x2: torch.Tensor, cfg: KernelConfig) -> dict:
    """The kernels' ``PDL`` flag, and the launch option that goes with it when on."""
    return {"PDL": True, "launch_pdl": True} if _pdl(x2, cfg) else {"PDL": False}


def _spin_ns(x2: torch.Tensor, cfg: KernelConfig) -> int:
    return cfg.spin_ns if x2.is_cuda and not _interpreting() else 0


def _asm(x2: torch.Tensor, cfg: KernelConfig) -> bool:
    """The GEMV decodes with fp16x2 PTX (modes 1-3)."""
    return (x2.dtype == torch.float16 and x2.is_cuda and not _interpreting()) if cfg.asm is None else cfg.asm


def _gemv(
    x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, groups: int = 1, u_tiled: bool = False
) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape  # P: all paths of all ``groups`` layers (two launches only)
    r, W_in = v.shape[1:]
    ptx = x2.is_cuda and not _interpreting()
    asm = _asm(x2, cfg)
    mode1, mode2 = (1, 2) if asm else (0, 0)
    bits = ptx and _use_bitserial(x2, h, bias, cfg, d_out * W_r, W_r)
    stage1 = cfg.stage1_bitserial if cfg.stage1_bitserial is not None else W_in >= _BITSERIAL_STAGE1_WORDS
    assert bits or not u_tiled, "tile-ordered signs go to the bit-serial stage 2 only"
    if bits and stage1 and g.dtype == h.dtype == l.dtype == x2.dtype:
        _gemv_bitserial(x2, u, v, h, l, g, bias, y, cfg, sms, groups, u_tiled)
        return
    fuse = bits and cfg.quantize_in_stage1 is not False
    planes = _stage1_to_planes(x2, v, l, g, cfg, sms) if fuse else None
    if planes is not None:
        tile = _bit_tile(d_out, W_r, groups, cfg, sms, P // groups, u_tiled)
        cuda_bitserial.gemv(planes, u, h, bias, y, W_r, P // groups, groups, tile, _pdl(x2, cfg))
        return
    tok = _pow2_at_least(M)
    b1, br, warps1, n_rb, chunk, n_split = _stage1_geometry(W_in, r, P, cfg, sms)
    reduce = cfg.gemv_reduce if cfg.gemv_reduce is not None else W_r >= 32
    b2, bo, warps2 = _stage2_tile(d_out, W_r, groups, cfg, sms, reduce and not cfg.single_launch)
    mma = not bits and ptx and _use_mma(x2, h, bias, cfg, asm, br, d_out * W_r)
    if mma:  # stage 1 writes t as the fp16 pairs the tensor-core stage 2 reads, a word's 16 contiguous
        b2, reduce = 1, True
    if bits:  # stage 1 writes t whole in fp32, one entry per bit, for the kernel that quantizes it
        b2, mode2, reduce = 1, 0, True
    t_len = triton.cdiv(W_r, b2) * 32 * b2
    if cfg.single_launch:
        assert groups == 1, "grouped calls take two launches"
        ws = _workspace(x2.device, M * P * t_len, "one")
        n1, n2 = P * n_rb * n_split, triton.cdiv(d_out, bo)
        # stage 2 alone needs 48 registers, stage 1 80: one kernel runs stage 2 at 6 CTAs per SM, not 10
        extra = {"maxnreg": cfg.gemv_maxnreg} if cfg.gemv_maxnreg and not _interpreting() else {}
        with _zeroed_on_error(ws):
            _gemv_kernel[(n1 + n2,)](
                x2, g, v, l, ws.t, ws.counter, u, h, y if bias is None else bias, y,
                M, r, W_in, d_in, x2.stride(0), n_rb, chunk, t_len, d_out, W_r, y.stride(0), ws.cap, n1, n2,
                P=P, TOK=tok, BR=br, B1=b1, MODE1=mode1, BO=bo, B2=b2, MODE2=mode2, HAS_BIAS=bias is not None,
                PTX=ptx, CG=cfg.t_cg, ZB=_SLICE_BLOCK, NS=_spin_ns(x2, cfg), num_warps=max(warps1, warps2),
                **extra,
            )  # fmt: skip
        return
    n_t = M * P * t_len
    if reduce:
        n_part = _align4(n_split * M * P * r)  # the bit planes after it stay 16-byte aligned
        n_bits = cuda_bitserial.workspace_floats(P, W_r) if bits else 0
        ws = _workspace(x2.device, n_t + n_part + n_bits, "reduce", P * n_rb)
        part = ws.t[n_t:]
        if mode2 == 2 and br % 32 == 0:  # stage 1 writes whole fp16x2 pairs: no packing in stage 2
            mode2 = 3
    else:
        ws = _workspace(x2.device, n_t)
        part = ws.t
    t_pairs = ws.t.view(torch.int32) if mode2 == 3 else ws.t  # stage 2's t: fp16x2 words or fp32
    pdl = _pdl_args(x2, cfg)
    with _zeroed_on_error(ws):
        _gemv_v_kernel[(P * n_rb, n_split)](
            x2, g, v, l, ws.t, t_pairs, part, ws.counter, M, r, W_in, d_in, x2.stride(0), n_rb, chunk, t_len,
            W_r,
            P=P, TOK=tok, BR=br, B1=b1, MODE1=mode1, B2=b2, MODE2=mode2, PTX=ptx, REDUCE=reduce,
            RELEASE_ONLY=cfg.release_tickets, num_warps=warps1, **pdl,
        )  # fmt: skip
        if bits:
            planes = ws.t[n_t + n_part :]
            cuda_bitserial.quantize(ws.t, planes, r, W_r, P, pdl["PDL"], t_len)
            tile = _bit_tile(d_out, W_r, groups, cfg, sms, P // groups, u_tiled)
            cuda_bitserial.gemv(planes, u, h, bias, y, W_r, P // groups, groups, tile, pdl["PDL"])
            return
        if mma:
            tile = _mma_tile(d_out, W_r, P // groups, groups, cfg, sms)
            cuda_mma.stage2(t_pairs, u, h, bias, y, W_r, t_len, P // groups, groups, tile, pdl["PDL"])
            return
        n_ob = triton.cdiv(d_out, bo)
        _gemv_u_kernel[(groups * n_ob,)](
            t_pairs, ws.counter, u, h, y if bias is None else bias, y, M, d_out, W_r,
            y.stride(0), t_len, n_ob,
            P=P // groups, TOK=tok, BO=bo, B2=b2, MODE2=mode2, HAS_BIAS=bias is not None, PTX=ptx,
            ZB=_ZERO_BLOCK, G=groups, REDUCE=reduce, RELEASE_ONLY=cfg.release_tickets, num_warps=warps2,
            **pdl,
        )  # fmt: skip


def _tensor_cores(x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, u_tiled: bool = False) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    bm = min(64, max(16, _pow2_at_least(M)))
    n_mb = triton.cdiv(M, bm)
    Rp = 32 * W_r
    # The interpreter rounds to bf16 by truncation, a bias that piles up over a sum; it computes the
    # bf16 products in fp32 instead, which still checks everything but the rounding.
    op_dt = torch.float32 if _interpreting() and x2.dtype == torch.bfloat16 else x2.dtype
    rows = cfg.tc_rows or (64 if r < 1024 else 128)
    words = cfg.tc_words or (2 if rows <= 64 else 4)
    target = int(cfg.tc_waves * sms)
    n_rb = triton.cdiv(r, rows)
    chunk, n_split = _split(W_in, words, P * n_rb * n_mb, target)
    bo = rows
    while bo > 16 and triton.cdiv(d_out, bo) * n_mb < target:
        bo //= 2
    if cfg.tc_single_launch:
        ws = _workspace(x2.device, M * P * Rp, "one")
        n_ob = triton.cdiv(d_out, bo)
        n1, n2 = P * n_rb * n_split * n_mb, n_ob * n_mb
        # both stages' code in one kernel: more registers than either alone (sm_90: 203 against 123)
        extra = {"maxnreg": cfg.tc_maxnreg} if cfg.tc_maxnreg and not _interpreting() else {}
        with _zeroed_on_error(ws):
            _tc_kernel[(n1 + n2,)](
                x2, g, v, l, ws.t, ws.counter, u, h, y if bias is None else bias, y,
                M, r, W_in, d_in, x2.stride(0), Rp, n_rb, chunk, n_split, d_out, W_r, y.stride(0), n_ob,
                ws.cap, n1, n2,
                P=P, BR=rows, BKW=words, BM=bm, BO=bo, HAS_BIAS=bias is not None, OP_DT=_TL_DTYPES[op_dt],
                CG=cfg.t_cg, ZB=_SLICE_BLOCK, NS=_spin_ns(x2, cfg), TILED=u_tiled, num_warps=cfg.tc_warps,
                **extra,
            )  # fmt: skip
        return
    ws = _workspace(x2.device, M * P * Rp)
    pdl = _pdl_args(x2, cfg)
    with _zeroed_on_error(ws):
        _tc_v_kernel[(P * n_rb, n_split, n_mb)](
            x2, g, v, l, ws.t, M, r, W_in, d_in, x2.stride(0), Rp, n_rb, chunk,
            P=P, BR=rows, BKW=words, BM=bm, OP_DT=_TL_DTYPES[op_dt], num_warps=cfg.tc_warps, **pdl,
        )  # fmt: skip
        _tc_u_kernel[(triton.cdiv(d_out, bo), n_mb)](
            ws.t, ws.counter, u, h, y if bias is None else bias, y, M, d_out, W_r, Rp, y.stride(0),
            P=P, BO=bo, BKW=words, BM=bm, HAS_BIAS=bias is not None, OP_DT=_TL_DTYPES[op_dt],
            ZB=_ZERO_BLOCK, TILED=u_tiled, num_warps=cfg.tc_warps, **pdl,
        )  # fmt: skip


def littlebit_linear_triton(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    groups: int = 1,
    u_tiled: bool = False,
) -> torch.Tensor:
    """The packed product on the GPU (or on CPU tensors under ``TRITON_INTERPRET=1``); any token count.

    ``u_tiled``: ``u_signs`` in tile order (``packing.tile_order``), which the bit-serial stage 2 and
    the tensor-core path read as it is; the other one-token stage 2s take a transient row-ordered copy.

    ``groups`` > 1: that many layers of one shape on the same input, their tensors stacked along the
    path axis (``ops.littlebit_linear``); their outputs come side by side. The batch-1 GEMV
    runs them all in one pair of launches, the other paths one layer after another.
    """
    cfg = config or DEFAULT_CONFIG
    _check(x, u_signs, v_signs, h, l, g)
    if groups < 1 or u_signs.shape[0] % groups:
        raise ValueError(f"{u_signs.shape[0]} stacked paths do not split into {groups} layers")
    d_in, d_out = g.shape[-1], h.shape[-1]
    x2 = x.reshape(-1, d_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], groups * d_out), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        sms = 4 if _interpreting() or not x.is_cuda else _num_sms(x.device.index or 0)
        tensors = [t.contiguous() for t in (u_signs, v_signs, h, l, g)]
        b = bias.contiguous() if bias is not None else None
        gemv = x2.shape[0] <= cfg.gemv_max_tokens
        if u_tiled and gemv and not (x2.shape[0] == 1 and _takes_tiled(x2, tensors[0], tensors[2], b, cfg)):
            tensors[0], u_tiled = untile_order(tensors[0]), False
        if gemv and not cfg.single_launch:
            _gemv(x2, *tensors, b, y, cfg, sms, groups, u_tiled)
        else:
            for j in range(groups):  # the kernels write through y's row stride, so a column slice works
                layer, bj = group_layer(tensors, b, groups, j)
                yj = y[:, j * d_out : (j + 1) * d_out]
                if gemv:
                    _gemv(x2, *layer, bj, yj, cfg, sms)
                else:
                    _tensor_cores(x2, *layer, bj, yj, cfg, sms, u_tiled)
    return y.reshape(*x.shape[:-1], groups * d_out)


def accepts(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> bool:
    """CUDA tensors in fp16/bf16 with int32 words and at most ``MAX_TOKENS`` tokens."""
    return (
        x.is_cuda
        and u_signs.is_cuda
        and v_signs.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and u_signs.dtype == torch.int32
        and v_signs.dtype == torch.int32
        and x.shape[-1] > 0
        and x.numel() // x.shape[-1] <= MAX_TOKENS
    )
