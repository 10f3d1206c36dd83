"""``KernelConfig``: the GPU kernels' tile shapes and per-family switches, all defaulting to the shipped
rules (``tiles`` for the tile shapes, ``route`` for which kernel family a call takes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes and kernel choices; 0 or None: the shipped rule (``tiles``, ``route``; docs/kernels.md)."""

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
    # programmatic dependent launch, so stage 2 (and the next layer's stage 1) is scheduled
    # while the previous kernel runs (``_sync``); None: on sm_90+ GPUs when Triton has it
    pdl: bool | None = None
    # GEMV: stage 1 stores per-split partial sums and the last program of each row block adds
    # them into t (fixed order: deterministic; fp16x2 pairs for stage 2 when it can), instead of atomics
    # into a zero t that the last stage-2 program clears after a ticket every stage-2 program takes on
    # one address. None: for ranks of 1024 and more (32-word rows), where it won on the H100 (8192x28672
    # at 1.0 BPW 42.5 -> 33.7 µs); on small layers its longer stage-1 tail cost as much as it saved.
    gemv_reduce: bool | None = None
    # batch-1 GEMV: stage 2 on tensor cores (``cuda_mma``, CUDA C++ through NVRTC; fp16, sm_80+), stage 1
    # then writes t as fp16 pairs, a word's 16 contiguous. None: where NVRTC and the GPU allow it, for
    # S_U sizes where it won on the H100 (``_MMA_WORDS``; 4096x4096 at 0.55 BPW 7.7 -> 6.3 µs)
    stage2_mma: bool | None = None
    mma_rows: int = 0  # 16-row tiles per program; 0: chosen by shape (``_mma_tile``)
    mma_words: int = 0  # words a thread per unit (unit = 4 * mma_words words of one path's rows); 0: by shape
    mma_warps: int = 0  # warps per program sharing its units; 0: by shape
    # batch-1 GEMV: stage 2 as bit-serial binary MMAs (``cuda_bitserial``: t quantized per 256 entries
    # to 16 bit planes by a small kernel between the stages, sign words used as they are). None: where
    # NVRTC and the GPU allow it, for S_U of at least ``_BITSERIAL_WORDS`` words per path. Takes
    # precedence over ``stage2_mma``.
    stage2_bitserial: bool | None = None
    bits_rows: int = 0  # 16-row tiles per warp; 0: by shape (``_bit_tile``)
    bits_split: int = 0  # warps splitting the units of the same rows; 0: by shape
    bits_groups: int = 0  # such row groups per program; 0: by shape
    bits_depth: int = 0  # units a warp has in flight; 0: by shape
    # with the bit-serial stage 2: stage 1 bit-serial as well (x * g quantized to bit planes per path,
    # S_V^T rows as the MMA rows, every path a group), four launches with no Triton kernel. None: for
    # inputs of at least ``_BITSERIAL_STAGE1_WORDS`` words.
    stage1_bitserial: bool | None = None
    # with the bit-serial stage 2: stage 1 quantizes t for it (the last program per block of 256 rows
    # makes that block's planes) instead of a launch in between. None: where the programs' rows tile
    # those blocks (``_stage1_to_planes``, ``cuda_bitserial.quantizes_output``).
    quantize_in_stage1: bool | None = None
    bits1_rows: int = 0  # the bit-serial stage 1's tile (``_bit_tile1``); 0: its default
    bits1_split: int = 0
    bits1_groups: int = 0
    bits1_depth: int = 0
    # many tokens (prompts, evaluation, serving batches): from this many tokens on, the prefill kernels
    # (``prefill``: GEMM-shaped tiles, no atomics); fewer take the tensor-core kernels above
    prefill_min_tokens: int = 65
    prefill_tokens: int = 0  # tokens per program; 0: 128 with 128 latent rows unless under waves, else 64
    prefill_rows: int = 0  # stage-1 latent rows per program; 0: 128 from 1024 latents (all paths), else 64
    prefill_out: int = 0  # stage-2 output rows per program; 0: 128
    prefill_words: int = 0  # words per step (32 entries each); 0: 2
    prefill_warps: int = 0  # 0: 8 for 128-token tiles, else 4
    prefill_stages: int = 0  # software pipeline depth; 0: 3
    prefill_waves: float = 2.0  # programs per SM aimed for, by smaller token blocks, then splits of d_in
    # from this many tokens on, the factors expanded per call and two cuBLAS GEMMs (``gemm``) instead of
    # the prefill kernels: on the H100 the GEMMs were faster from 65 tokens on the three 7B cases of the
    # sweep and from 128 on all four (8192x28672 at 1.0 BPW: 387 against 428 µs; at 96 tokens the prefill
    # kernels still won there, 373 against 391; ``prefill_gemm_h100.json``)
    gemm_min_tokens: int = 128


DEFAULT_CONFIG = KernelConfig()
