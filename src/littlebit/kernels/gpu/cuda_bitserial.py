"""Stage 2 of the batch-1 GEMV as bit-serial binary MMAs: no sign decoding at all.

Why: at batch 1 the cost of stage 2 is turning sign bits into signed sums. The fp16 tensor-core
stage 2 (``cuda_mma``) still spends an instruction a bit making fp16 (+-1) fragments, plus the loop's
bookkeeping, and ran at a third of the copy bandwidth on the largest layers. Here the sign words go
into ``mma.m16n8k256.b1.and.popc`` as they are in memory; the other operand carries t as bit planes.

t (fp32, stage 1's output) is cut into blocks of 256 entries (8 sign words). ``quantize`` gives each
block a scale s = max|t| / 32767 and writes q = round(t / s) as 16 two's-complement bit planes c_k
(bit j of plane k = bit k of q_j). For a row b of sign bits (1 = +1, 0 = -1):

    sum_j (2 b_j - 1) t_j = 2 s sum_k w_k popc(b & c_k) - s sum_j q_j,   w_k = 2^k, w_15 = -2^15

One MMA puts planes 0-7 in its 8 columns, a second planes 8-15: two instructions per 16 rows x 256
signs. A thread's four counts per row are combined in integers and scaled by s in fp32; ``quantize``
stores each block's constant ``s * sum q`` next to its scale. The quantization error is
that of a 16-bit mantissa per block (relative error of y ~1e-4 at max/rms 10, about fp16's).

Fragment layout (``m16n8k256``): thread (g, q) holds 32 k-bits of rows g and g + 8 in each of two
k-halves. The k order is a permutation of r applied to both operands: thread q's first half takes
sign word ``8 kb + 2 q``, its second ``8 kb + 2 q + 1``, so a thread reads two adjacent words of a row
(one 8-byte load when rows are 8-byte aligned) and a warp's loads cover 32 contiguous bytes of each of
its 16 rows. The planes of block kb are stored in that order: thread (g, q)'s four B registers
(plane g and plane 8 + g, words 2q and 2q + 1) are 16 contiguous bytes, one load per block.

A program is ``RG * KS`` warps: ``RG`` groups of ``16 * MT`` rows, each shared by ``KS`` warps that
split the (path, block) units and add their sums through shared memory. ``DEPTH`` units per warp are
in flight (registers refilled as each is used). The kernels' source is ``cuda/bitserial.cu``
(``SOURCE``), compiled with the tile, ``PATHS``, ``BF16`` and ``TILED`` defined.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from importlib.resources import files

import torch

from littlebit.kernels.gpu import _nvrtc
from littlebit.kernels.gpu._nvrtc import NvrtcUnavailable

BLOCK = 256  # entries of t per quantization block: the MMA's k
PLANE_WORDS = 128  # 16 planes x 8 words per block
QMAX = 32767

SOURCE = (files(__package__) / "cuda" / "bitserial.cu").read_text(encoding="utf-8")


@dataclass(frozen=True)
class BitTile:
    """``MT`` 16-row tiles a warp, ``KS`` warps splitting the units of the same rows, ``RG`` such row
    groups per program, ``DEPTH`` units a warp has in flight."""

    mt: int = 1
    ks: int = 1
    rg: int = 4
    depth: int = 4
    tiled: bool = False  # the signs are in tile order (``packing.tile_order``)


def n_blocks(W_r: int) -> int:
    return -(-W_r // 8)


def workspace_floats(paths_total: int, W_r: int) -> int:
    """fp32 slots ``quantize`` writes: the planes and (scale, constant) pairs of every path."""
    return paths_total * n_blocks(W_r) * (PLANE_WORDS + 2)


def split_workspace(ws: torch.Tensor, paths_total: int, W_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planes int32, scale pairs fp32) views of a float32 buffer of ``workspace_floats``."""
    n_pl = paths_total * n_blocks(W_r) * PLANE_WORDS
    return ws[:n_pl].view(torch.int32), ws[n_pl : n_pl + 2 * paths_total * n_blocks(W_r)]


def compile_cubin(tile: BitTile, paths: int, bf16: bool, arch: int) -> bytes:
    defs = {"MT": tile.mt, "KS": tile.ks, "RG": tile.rg, "DEPTH": tile.depth, "PATHS": paths}
    defs |= {"BF16": int(bf16), "TILED": int(tile.tiled)}
    return _nvrtc.compile_cubin(SOURCE, defs, arch, "littlebit_bitserial.cu")


@functools.cache
def _functions(tile: BitTile, paths: int, bf16: bool, device_index: int) -> tuple[ctypes.c_void_p, ...]:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = compile_cubin(tile, paths, bf16, 10 * major + minor)
    return tuple(
        _nvrtc.load_function(cubin, name, device_index)
        for name in ("littlebit_quantize", "littlebit_bitserial_gemv")
    )


@functools.cache
def available(device_index: int = 0) -> bool:
    """NVRTC loads, the GPU has binary MMAs (sm_80+) and the kernels compile and load."""
    try:
        if torch.cuda.get_device_capability(device_index)[0] < 8:
            return False
        _functions(BitTile(), 2, False, device_index)
        return True
    except (NvrtcUnavailable, RuntimeError, OSError):
        return False


def quantize(
    src: torch.Tensor, ws: torch.Tensor, n_valid: int, W: int, paths_total: int, pdl: bool,
    src_stride: int, scale: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Path p's vector, entries ``src[p * src_stride + j]`` for j < ``n_valid`` (0 after, up to 32 W),
    times ``scale[p, j]`` when given, to bit planes and scales in ``ws`` (``split_workspace``).
    ``src``: fp32 (t), or fp16/bf16 (x, with ``src_stride`` 0 and ``scale`` g of the same dtype)."""
    planes, scales = split_workspace(ws, paths_total, W)
    half = src.dtype != torch.float32
    func = _functions(BitTile(), 2, src.dtype == torch.bfloat16, src.device.index or 0)[0]
    nkb = n_blocks(W)
    args = [
        _nvrtc.ptr(src), _nvrtc.ptr(scale), _nvrtc.ptr(planes), _nvrtc.ptr(scales), ctypes.c_long(src_stride),
        ctypes.c_int(n_valid), ctypes.c_int(nkb), ctypes.c_int(half), ctypes.c_int(pdl),
    ]  # fmt: skip
    _nvrtc.launch(func, (paths_total * nkb, 1), 128, 0, args, src.device, pdl)


@dataclass(frozen=True)
class SelfQuantizing:
    """A stage-1 ``gemv`` that quantizes its own output t (``out``, fp32) into the planes of ``t_ws``
    (``workspace_floats`` of the paths and the rank's words) instead of a ``quantize`` launch.
    ``counters``: int32, at least ``counters_needed``, all zero (as the call leaves them)."""

    counters: torch.Tensor
    t_ws: torch.Tensor


def counters_needed(paths: int, rows: int) -> int:
    return paths * -(-rows // BLOCK)


def quantizes_output(tile: BitTile) -> bool:
    """A stage 1 of this tile can quantize t itself: its programs' rows tile the blocks of 256."""
    return BLOCK % (16 * tile.mt * tile.rg) == 0


def gemv(
    ws: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    W: int, paths: int, groups: int, tile: BitTile, pdl: bool, out_stride: int | None = None,
    fused: SelfQuantizing | None = None,
) -> None:  # fmt: skip
    """out[grp * out_stride + i] = sum_p h_p[i] * (S_p v_p)[i] (+ bias[i]) for every row i of every
    group, v_p as ``quantize`` left it in ``ws`` (or as ``fused`` makes it). ``signs`` (groups * paths,
    rows, W) int32; ``h`` and ``bias`` (groups * paths, rows) fp16 or bf16; ``out`` contiguous, fp32 or
    the dtype of ``h``. Stage 2 is one call with ``paths`` 1-2 and ``groups`` layers; stage 1 one with
    ``paths`` 1 and every path its own group (h = l, out = t)."""
    planes, scales = split_workspace(ws, groups * paths, W)
    rows = h.shape[-1]
    if tile.tiled and rows % 16:
        raise ValueError(f"{tile}: tile order needs rows in multiples of 16")
    func = _functions(tile, paths, h.dtype == torch.bfloat16, out.device.index or 0)[1]
    t_n = 0
    cnt = t_planes = t_scales = None
    if fused is not None:
        if paths != 1 or out.dtype != torch.float32 or fused.counters.numel() < counters_needed(groups, rows):
            raise ValueError("a self-quantizing gemv is a stage 1: one path a group, fp32 t, enough counters")
        if not quantizes_output(tile):
            raise ValueError(f"{tile}: programs of {16 * tile.mt * tile.rg} rows do not tile blocks")
        cnt = fused.counters
        t_planes, t_scales = split_workspace(fused.t_ws, groups, -(-rows // 32))
        t_n = rows
    args = [
        _nvrtc.ptr(planes), _nvrtc.ptr(scales), _nvrtc.ptr(signs), _nvrtc.ptr(h),
        _nvrtc.ptr(bias if bias is not None else h), _nvrtc.ptr(out), ctypes.c_int(rows), ctypes.c_int(W),
        ctypes.c_int(n_blocks(W)), ctypes.c_int(bias is not None), ctypes.c_int(pdl),
        ctypes.c_long(rows if out_stride is None else out_stride), ctypes.c_int(out.dtype == torch.float32),
        _nvrtc.ptr(t_planes), _nvrtc.ptr(t_scales), ctypes.c_int(t_n), _nvrtc.ptr(cnt),
    ]  # fmt: skip
    grid = (-(-rows // (16 * tile.mt * tile.rg)), groups)
    _nvrtc.launch(func, grid, 32 * tile.rg * tile.ks, 0, args, out.device, pdl)


# --- pure-PyTorch reference (any device): what the kernels compute, for tests -----------------------

_PLANE_WEIGHTS = [float(1 << k) for k in range(15)] + [-float(1 << 15)]


def reference_quantize(v: torch.Tensor, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` of the fp32 vectors ``v`` (paths, n), n <= 32 W: (planes int32 (paths, blocks, 32,
    4) in the kernel's order, scale pairs fp32 (paths, blocks, 2)), bit for bit."""
    P, n = v.shape
    nkb = n_blocks(W)
    blk = torch.zeros(P, nkb * BLOCK, dtype=torch.float32, device=v.device)
    blk[:, :n] = v.float()
    blk = blk.view(P, nkb, BLOCK)
    amax = blk.abs().amax(-1)
    # a true division, as the kernel's (``QMAX / amax`` on a tensor multiplies by a reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / amax, torch.zeros_like(amax))
    q = torch.round(blk * inv[..., None]).clamp(-QMAX, QMAX).to(torch.int64)
    s = amax / QMAX
    scales = torch.stack([s, 0.5 * s * q.sum(-1).float()], -1)
    bits = (q.view(P, nkb, 8, 1, 32) >> torch.arange(16, device=v.device).view(1, 1, 1, 16, 1)) & 1
    words = (bits << torch.arange(32, device=v.device)).sum(-1)  # (P, nkb, word w, plane k)
    w_even, w_odd = words[:, :, 0::2], words[:, :, 1::2]  # word 2q, 2q + 1: (P, nkb, q, plane)
    order = torch.stack([w_even[..., :8], w_odd[..., :8], w_even[..., 8:], w_odd[..., 8:]], -1)
    planes = order.permute(0, 1, 3, 2, 4).reshape(P, nkb, 32, 4)  # thread (g, q) = 4 g + q
    return planes.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32), scales
