"""Stage 2 of the batch-1 GEMV on tensor cores, in CUDA C++ compiled at run time (NVRTC).

Why not Triton: at batch 1 the cost of stage 2 is turning sign bits into signed sums. On CUDA cores
the cheapest form is a shift, a lop3 that flips an fp16 pair's signs and an fp16x2 add per two bits,
~2 instructions a bit with the overheads (docs/kernels.md). On tensor cores the add goes
to the MMA unit: a shift and one lop3 turn two bits into the fp16 pair (+-1, +-1) that *is* an A
fragment register of ``mma.m16n8k16``, so decoding is one instruction a bit. That needs the decoded
bits to land in the MMA's register layout, which Triton only reaches through shared memory.

The fragment layout is chosen to fit the words instead of the other way round: the MMA's k index is
a permutation of the columns, applied to both operands. Thread (g, q) of a warp (g = lane / 4,
q = lane % 4) owns word ``W0 + 4 * j + q`` of rows g and g + 8 of each 16-row tile; its pair i
(bits i and i + 16, ``(~w << (15 - i)) & 0x80008000 | 0x3C003C00``) fills k slot q with i = 2 s and
k slot q + 4 with i = 2 s + 1 of MMA number s. The B operand is t (stage 1's output, fp16 pairs of
bits i and i + 16, a word's 16 pairs contiguous: ``KernelConfig`` words_u 1, vector mode 3), read by
the same thread for the same word, so four 16-byte loads bring what a word's eight MMAs need. All
eight columns of B carry the same vector (every lane loads it), so every lane ends with its rows'
sums. Sums are fp32 over the whole row (the CUDA-core path adds 32 terms in fp16).

A program is ``WARPS`` warps on ``16 * MT`` output rows; the warps share the (path, chunk of
``4 * WPT`` words) units of those rows and add their h-scaled sums through shared memory.
The kernel's source is ``cuda/mma_stage2.cu`` (``SOURCE``), compiled with ``MT``, ``WPT`` and ``WARPS``
defined.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from importlib.resources import files

import torch

from littlebit.kernels.gpu import _nvrtc
from littlebit.kernels.gpu._nvrtc import NvrtcUnavailable

SOURCE = (files(__package__) / "cuda" / "mma_stage2.cu").read_text(encoding="utf-8")


@dataclass(frozen=True)
class MmaTile:
    """``MT`` 16-row tiles per program, ``WPT`` words a thread per unit (a unit is 4 * WPT words of
    one path's rows), ``WARPS`` warps per program sharing the units."""

    mt: int = 2
    wpt: int = 4
    warps: int = 4


def compile_cubin(tile: MmaTile, arch: int, source: str | None = None) -> bytes:
    """The stage-2 kernel for ``tile`` as a cubin for ``sm_<arch>`` (no GPU needed); ``source``: a
    variant of ``SOURCE`` with the same kernel signature (benchmarks try decodings with it)."""
    defs = {"MT": tile.mt, "WPT": tile.wpt, "WARPS": tile.warps}
    return _nvrtc.compile_cubin(source or SOURCE, defs, arch, "littlebit_stage2.cu")


@functools.cache
def _function(tile: MmaTile, device_index: int, source: str | None = None) -> ctypes.c_void_p:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = compile_cubin(tile, 10 * major + minor, source)
    return _nvrtc.load_function(cubin, "littlebit_stage2_mma", device_index)


@functools.cache
def available(device_index: int = 0) -> bool:
    """NVRTC loads, the GPU has mma.sync for fp16 (sm_80+) and the kernel compiles and loads; False
    sends calls to the Triton stage 2 (the tests compile through ``_function``, so a broken kernel
    fails there instead of being skipped)."""
    try:
        if torch.cuda.get_device_capability(device_index)[0] < 8:
            return False
        _function(MmaTile(), device_index)
        return True
    except (NvrtcUnavailable, RuntimeError, OSError):
        return False


def stage2(
    t_pairs: torch.Tensor, u: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
    W_r: int, t_len: int, paths: int, groups: int, tile: MmaTile, pdl: bool, source: str | None = None,
) -> None:  # fmt: skip
    """y[:, grp * d_out:(grp + 1) * d_out] = sum_p h_p * S_U,p t_p (+ bias) for one token.

    ``t_pairs``: int32 view of t, word k of path p at ``p * t_len + 32 k`` (16 fp16 pairs); ``u``
    (groups * paths, d_out, W_r) int32; ``h`` fp16; ``y`` fp16 (1, groups * d_out), contiguous.
    ``source``: a variant of the kernel (``compile_cubin``).
    """
    d_out = u.shape[1]
    n_chunks = -(-W_r // (4 * tile.wpt))
    func = _function(tile, y.device.index or 0, source)
    args = [
        _nvrtc.ptr(t_pairs), _nvrtc.ptr(u), _nvrtc.ptr(h), _nvrtc.ptr(bias if bias is not None else y),
        _nvrtc.ptr(y), ctypes.c_int(d_out), ctypes.c_int(W_r), ctypes.c_int(t_len), ctypes.c_int(n_chunks),
        ctypes.c_int(paths), ctypes.c_int(bias is not None), ctypes.c_int(pdl),
        ctypes.c_uint(0x80008000), ctypes.c_uint(0x3C003C00),
    ]  # fmt: skip
    grid = (-(-d_out // (16 * tile.mt)), groups)
    _nvrtc.launch(func, grid, 32 * tile.warps, 0, args, y.device, pdl)
