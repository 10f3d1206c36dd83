"""Stage 2 of the batch-1 GEMV on tensor cores, in CUDA C++ compiled at run time (NVRTC).

Why not Triton: at batch 1 the cost of stage 2 is turning sign bits into signed sums. On CUDA cores
the cheapest form is a shift, a lop3 that flips an fp16 pair's signs and an fp16x2 add per two bits,
~2 instructions a bit with the overheads (benchmarks/KERNELS_NOTES.md). On tensor cores the add goes
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
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import _nvrtc
from ._nvrtc import NvrtcUnavailable

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float h2f(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

// Bits i and i + 16 of w as the fp16 pair (+1 where set, -1 where clear). The two constants come in
// as kernel arguments (0x80008000, 0x3C003C00): as immediates ptxas splits the lop3 in two, one
// immediate per instruction.
__device__ __forceinline__ u32 sign_pair(u32 w, int i, u32 sign_bits, u32 one) {
    return (~(w << (15 - i)) & sign_bits) | one;
}

__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

struct Unit { int p, c; };  // path, chunk
__device__ __forceinline__ Unit step(Unit x, int n_chunks) {
    x.c += WARPS;
    while (x.c >= n_chunks) x.c -= n_chunks, ++x.p;
    return x;
}

__device__ __forceinline__ void cp_async4(unsigned dst, const u32* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const u32* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

// A unit: path p, words [W0, W0 + 4 WPT) of the program's rows (W0 = 4 WPT c for chunk c); thread q
// takes words W0 + 4 j + q. Words past W_r read as 0 and meet t pairs of 0.
__device__ __forceinline__ void load_signs(
    const u32* __restrict__ u, const u16* __restrict__ h, int p, int W0, int d_out, int W_r, int q,
    long path_stride, const long (&row_off)[MT][2], const int (&rows)[MT][2], u32 (&a)[WPT][MT][2],
    float (&hv)[MT][2])
{
    const u32* up = u + p * path_stride;
    #pragma unroll
    for (int j = 0; j < WPT; ++j) {
        const int W = W0 + 4 * j + q;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf)
                a[j][m][hf] = W >= W_r ? 0u : STAGE ? up[row_off[m][hf] + W] : __ldg(up + row_off[m][hf] + W);
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf)
            hv[m][hf] = h2f(__ldg(h + p * d_out + rows[m][hf]));
}

// One unit: acc[m][hf] += h * (signs of the unit's words . t). t is read coherently (ld.global.ca, not
// the .nc path __ldg takes): with PDL the kernel that writes it may still have run when this one began.
__device__ __forceinline__ void decode_unit(
    const u32* t, int p, int W0, int W_r, int t_len, int q, const u32 (&a)[WPT][MT][2],
    const float (&hv)[MT][2], float (&acc)[MT][2], u32 sign_bits, u32 one)
{
    float d[MT][4];
    #pragma unroll
    for (int m = 0; m < MT; ++m) d[m][0] = d[m][1] = d[m][2] = d[m][3] = 0.f;
    #pragma unroll
    for (int j = 0; j < WPT; ++j) {
        const int W = W0 + 4 * j + q;
        uint4 b[4];
        if (W < W_r) {
            const uint4* bp = reinterpret_cast<const uint4*>(t + (long)p * t_len + (long)W * 32);
            #pragma unroll
            for (int v = 0; v < 4; ++v) b[v] = __ldca(bp + v);
        } else {
            #pragma unroll
            for (int v = 0; v < 4; ++v) b[v] = make_uint4(0u, 0u, 0u, 0u);  // past the rank: counts 0
        }
        const u32 bb[16] = {b[0].x, b[0].y, b[0].z, b[0].w, b[1].x, b[1].y, b[1].z, b[1].w,
                            b[2].x, b[2].y, b[2].z, b[2].w, b[3].x, b[3].y, b[3].z, b[3].w};
        #pragma unroll
        for (int s = 0; s < 8; ++s)
            #pragma unroll
            for (int m = 0; m < MT; ++m)
                mma(d[m], sign_pair(a[j][m][0], 2 * s, sign_bits, one),
                    sign_pair(a[j][m][1], 2 * s, sign_bits, one),
                    sign_pair(a[j][m][0], 2 * s + 1, sign_bits, one),
                    sign_pair(a[j][m][1], 2 * s + 1, sign_bits, one), bb[2 * s], bb[2 * s + 1]);
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
        acc[m][0] += d[m][0] * hv[m][0];
        acc[m][1] += d[m][2] * hv[m][1];
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) littlebit_stage2_mma(
    const u32* t, const u32* __restrict__ u, const u16* __restrict__ h,
    const u16* __restrict__ bias, u16* __restrict__ y,
    int d_out, int W_r, int t_len, int n_chunks, int P, int has_bias, int pdl, u32 sign_bits, u32 one)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int row0 = blockIdx.x * (16 * MT);
    const long grp = blockIdx.y;  // grouped call: layer grp's tensors follow the ones before it
    u += grp * P * d_out * (long)W_r;
    h += grp * P * d_out;
    t += grp * P * (long)t_len;
    y += grp * d_out;
    bias += grp * d_out;

    long row_off[MT][2];
    int rows[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            rows[m][hf] = min(row0 + m * 16 + hf * 8 + g, d_out - 1);  // rows past d_out: read, not written
            row_off[m][hf] = (long)(STAGE ? m * 16 + hf * 8 + g : rows[m][hf]) * W_r;
        }

    float acc[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = 0.f;

#if STAGE
    // The program's rows of each path are one contiguous block of words: copied whole into shared
    // memory with coalesced cp.async (a fragment's own loads would each touch 8 rows), then decoded
    // from there. Rows past d_out stay unwritten; their sums are dropped.
    extern __shared__ u32 sA[];
    const int rows_here = min(16 * MT, d_out - row0);
    const int n_blk = rows_here * W_r;
    const bool vec = ((d_out * W_r) & 3) == 0 && ((row0 * W_r) & 3) == 0;
    for (int pp = 0; pp < P; ++pp) {
        const u32* src = u + ((long)pp * d_out + row0) * W_r;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(sA + pp * 16 * MT * W_r);
        if (vec) {  // 16-byte copies; the block's start is 16-byte aligned
            for (int i = 4 * threadIdx.x; i < n_blk; i += 4 * 32 * WARPS) {
                if (i + 4 <= n_blk)
                    cp_async16(dst + 4 * i, src + i);
                else
                    for (int k = i; k < n_blk; ++k) cp_async4(dst + 4 * k, src + k);
            }
        } else {
            for (int i = threadIdx.x; i < n_blk; i += 32 * WARPS)
                cp_async4(dst + 4 * i, src + i);
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    const u32* a_src = sA;
    const long a_path = 16 * MT * (long)W_r;
#else
    const u32* a_src = u;
    const long a_path = (long)d_out * W_r;
#endif
    // Software pipeline: the sign words and h values of a warp's next unit are requested before its
    // current unit is decoded (two register sets, used in turn), so a unit's DRAM reads are always in
    // flight behind arithmetic. t is small and shared by every program: L1 and L2 hits, read per unit.
    u32 a0[WPT][MT][2], a1[WPT][MT][2];
    float h0[MT][2], h1[MT][2];
    // A warp's units are (path, chunk) pairs WARPS apart in path-major order, stepped without division.
    constexpr int CW = 4 * WPT;
    Unit c0 = step({0, warp - WARPS}, n_chunks);
    if (c0.p < P) load_signs(a_src, h, c0.p, CW * c0.c, d_out, W_r, q, a_path, row_off, rows, a0, h0);
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");  // t is the kernel before's output
    while (c0.p < P) {
        const Unit c1 = step(c0, n_chunks);
        if (c1.p < P) load_signs(a_src, h, c1.p, CW * c1.c, d_out, W_r, q, a_path, row_off, rows, a1, h1);
        decode_unit(t, c0.p, CW * c0.c, W_r, t_len, q, a0, h0, acc, sign_bits, one);
        if (c1.p >= P) break;
        c0 = step(c1, n_chunks);
        if (c0.p < P) load_signs(a_src, h, c0.p, CW * c0.c, d_out, W_r, q, a_path, row_off, rows, a0, h0);
        decode_unit(t, c1.p, CW * c1.c, W_r, t_len, q, a1, h1, acc, sign_bits, one);
    }
    if (pdl) asm volatile("griddepcontrol.launch_dependents;");

    __shared__ float part[WARPS][16 * MT];
    if (q == 0) {
        #pragma unroll
        for (int m = 0; m < MT; ++m) {
            part[warp][m * 16 + g] = acc[m][0];
            part[warp][m * 16 + 8 + g] = acc[m][1];
        }
    }
    __syncthreads();
    if (threadIdx.x < 16 * MT && row0 + (int)threadIdx.x < d_out) {
        float s = 0.f;
        #pragma unroll
        for (int w = 0; w < WARPS; ++w) s += part[w][threadIdx.x];
        const int row = row0 + threadIdx.x;
        if (has_bias) s += h2f(bias[row]);
        y[row] = f2h(s);
    }
}
"""


@dataclass(frozen=True)
class MmaTile:
    """``MT`` 16-row tiles per program, ``WPT`` words a thread per unit (a unit is 4 * WPT words of
    one path's rows), ``WARPS`` warps per program sharing the units."""

    mt: int = 2
    wpt: int = 4
    warps: int = 4
    stage: bool = False  # copy the program's sign words to shared memory first (coalesced)


def compile_cubin(tile: MmaTile, arch: int, source: str | None = None) -> bytes:
    """The stage-2 kernel for ``tile`` as a cubin for ``sm_<arch>`` (no GPU needed); ``source``: a
    variant of ``SOURCE`` with the same kernel signature (benchmarks try decodings with it)."""
    defs = {"MT": tile.mt, "WPT": tile.wpt, "WARPS": tile.warps, "STAGE": int(tile.stage)}
    return _nvrtc.compile_cubin(source or SOURCE, defs, arch, "littlebit_stage2.cu")


@functools.cache
def _function(tile: MmaTile, device_index: int, source: str | None = None) -> ctypes.c_void_p:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = compile_cubin(tile, 10 * major + minor, source)
    return _nvrtc.load_function(cubin, "littlebit_stage2_mma", device_index)


def staged_bytes(tile: MmaTile, paths: int, W_r: int) -> int:
    """Dynamic shared memory of a staged program: its rows' words of every path."""
    return paths * 16 * tile.mt * W_r * 4 if tile.stage else 0


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
    _nvrtc.launch(func, grid, 32 * tile.warps, staged_bytes(tile, paths, W_r), args, y.device, pdl)
