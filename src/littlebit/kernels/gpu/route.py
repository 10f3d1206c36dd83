"""Routing policy: which kernel family a call takes, by tokens, shape and dtype.

- at least ``KernelConfig.gemm_min_tokens`` tokens (default 128): the factors expanded per call and
  two cuBLAS GEMMs (``gemm``), one layer of a grouped call after another;
- at least ``KernelConfig.prefill_min_tokens`` tokens (default 65): the prefill kernels (``prefill``,
  GEMM-shaped tiles, no atomics), one layer of a grouped call after another;
- more than ``KernelConfig.gemv_max_tokens`` tokens (default 1): Triton tensor-core kernels
  (``_tensorcore``), one layer of a grouped call after another;
- otherwise the GEMV (``_gemv``): Triton stage 1, then for one token, fp16/bf16 and a GPU with binary
  MMAs, S_U of at least ``_BITSERIAL_WORDS`` words a path and rows of at least
  ``_BITSERIAL_RANK_WORDS`` words, the bit-serial stage 2 (``cuda_bitserial``; stage 1 bit-serial too
  from ``_BITSERIAL_STAGE1_WORDS`` input words); else for one fp16 token and S_U of at least
  ``_MMA_WORDS`` words the fp16 tensor-core stage 2 (``cuda_mma``); else the Triton stage 2;
- ``gemv_reduce``: stage 1 sums per-split partials (no atomics) for ranks of 1024 and more;
- PDL between launches on sm_90+.
"""

from __future__ import annotations

import functools
import os

import torch

from littlebit.kernels.gpu import cuda_bitserial, cuda_mma
from littlebit.kernels.gpu._sync import HAS_PDL
from littlebit.kernels.gpu.config import DEFAULT_CONFIG, KernelConfig


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Stage 2 on tensor cores by default for S_U of at least this many words per path (d_out * W_r): set
# where the partial-sums stage 1 that the tensor-core stage 2 needs cost more than it saved. With the
# current tiles it wins below too on 5 of the 6 grid layers there (8192x8192 at 0.1 BPW 6.7 -> 5.4 µs;
# it loses on 11008x4096 at 0.1, 5.2 -> 5.6 µs), which is not acted on. With one word a thread per
# unit the largest layers gain too (8192x28672 at 1.0 BPW 33.0 -> 30.9 µs, kernels_mma_tiles.json).
_MMA_WORDS = 64 * 1024


# Stage 2 as bit-serial MMAs by default for ranks of at least ``_BITSERIAL_RANK_WORDS`` words and S_U
# of at least ``_BITSERIAL_WORDS`` words per path (d_out * W_r). From H100 runs
# (benchmarks/results/kernels_bitserial_small_rows.json, bitserial_chain.json): 8192x28672 at 1.0 BPW 31.4 ->
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
    if want is False or x2.shape[0] != 1:
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
    if want is False or x2.shape[0] != 1 or not asm or br % 32:
        return False
    if want is None and words < _MMA_WORDS:
        return False
    if h.dtype != torch.float16 or (bias is not None and bias.dtype != torch.float16):
        return False
    return cuda_mma.available(x2.device.index or 0)


def kernel_family(M: int, cfg: KernelConfig) -> str:
    """``"gemv"``, ``"tensor-core"``, ``"prefill"`` or ``"gemm"`` for a call of ``M`` tokens."""
    if M >= cfg.gemm_min_tokens:
        return "gemm"
    if M >= cfg.prefill_min_tokens:
        return "prefill"
    return "gemv" if M <= cfg.gemv_max_tokens else "tensor-core"


def _reduce(cfg: KernelConfig, W_r: int) -> bool:
    """GEMV stage 1 sums per-split partials and writes t whole (``KernelConfig.gemv_reduce``)."""
    return cfg.gemv_reduce if cfg.gemv_reduce is not None else W_r >= 32


def _stage1_bitserial(cfg: KernelConfig, W_in: int) -> bool:
    """With the bit-serial stage 2: stage 1 bit-serial too (``KernelConfig.stage1_bitserial``)."""
    return cfg.stage1_bitserial if cfg.stage1_bitserial is not None else W_in >= _BITSERIAL_STAGE1_WORDS


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


def _asm(x2: torch.Tensor, cfg: KernelConfig) -> bool:
    """The GEMV decodes with fp16x2 PTX (modes 1-3)."""
    return (x2.dtype == torch.float16 and x2.is_cuda and not _interpreting()) if cfg.asm is None else cfg.asm
