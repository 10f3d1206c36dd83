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
in flight (registers refilled as each is used).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import _nvrtc
from ._nvrtc import NvrtcUnavailable

BLOCK = 256  # entries of t per quantization block: the MMA's k
PLANE_WORDS = 128  # 16 planes x 8 words per block
QMAX = 32767

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define FULL 0xffffffffu

__device__ __forceinline__ float h2f(u16 v) {
    float f;
#if BF16
    f = __uint_as_float((u32)v << 16);
#else
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
#endif
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 v;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
    return v;
}

// Block kb of path p's vector (t, or x times the path's g) to a scale and 16 bit planes in the MMA's
// B order (module doc), by warps 0 .. nw - 1 of the calling program (nw <= 4). Each warp reads the
// whole block (8 coalesced loads, so each finds the scale itself, no barrier) and makes the planes of
// word pairs warp, warp + nw, ... of its 4 (32 ballots a pair). t is read at L2: another program or
// kernel wrote it. With ``pdl``, g (a weight) is read before waiting on the kernel that writes the
// vector.
__device__ __forceinline__ void quantize_block(
    const void* src, const u16* __restrict__ gsc, u32* __restrict__ planes, float2* __restrict__ scales,
    long src_stride, int n_valid, int n_kb, int src_half, int p, int kb, int warp, int nw, int pdl)
{
    const int lane = threadIdx.x & 31;
    float gv[8];
    #pragma unroll
    for (int w = 0; w < 8; ++w) {
        const int j = 256 * kb + 32 * w + lane;
        gv[w] = src_half && j < n_valid ? h2f(__ldg(gsc + (long)p * n_valid + j)) : 1.f;
    }
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (pdl) asm volatile("griddepcontrol.launch_dependents;");
    float v[8];
    float amax = 0.f;
    #pragma unroll
    for (int w = 0; w < 8; ++w) {
        const int j = 256 * kb + 32 * w + lane;
        v[w] = 0.f;
        if (j < n_valid)  // x (shared by the paths: stride 0) times the path's g, or t
            v[w] = src_half ? h2f(((const u16*)src)[p * src_stride + j]) * gv[w]
                            : __ldcg((const float*)src + p * src_stride + j);
        amax = fmaxf(amax, fabsf(v[w]));
    }
    #pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    int qv[8], qsum = 0;
    #pragma unroll
    for (int w = 0; w < 8; ++w) {
        qv[w] = max(-32767, min(32767, __float2int_rn(v[w] * inv)));
        qsum += qv[w];
    }
    #pragma unroll
    for (int o = 16; o; o >>= 1) qsum += __shfl_xor_sync(FULL, qsum, o);
    u32* dst = planes + ((long)p * n_kb + kb) * 128;
    for (int pr = warp; pr < 4; pr += nw) {  // words 2 pr, 2 pr + 1 (as thread q = pr reads them)
        #pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int w = 2 * pr + j;
            int qw = qv[0];
            #pragma unroll
            for (int i = 1; i < 8; ++i) qw = w == i ? qv[i] : qw;
            u32 mine = 0u;  // lane k < 16: plane k of word w
            #pragma unroll
            for (int k = 0; k < 16; ++k) {
                const u32 b = __ballot_sync(FULL, (qw >> k) & 1);
                mine = lane == k ? b : mine;
            }
            if (lane < 16) dst[((lane & 7) * 4 + pr) * 4 + (lane >> 3) * 2 + j] = mine;
        }
    }
    // (s, s * sum q / 2): stage 2 doubles its sums when it applies h, so the constant goes in halved
    const float s = amax / 32767.f;
    if (warp == 0 && lane == 0) scales[(long)p * n_kb + kb] = make_float2(s, 0.5f * s * qsum);
}

// One program per block of 256 (grid: paths x blocks), 4 warps.
extern "C" __global__ void __launch_bounds__(128) littlebit_quantize(
    const void* src, const u16* __restrict__ gsc, u32* __restrict__ planes, float2* __restrict__ scales,
    long src_stride, int n_valid, int n_kb, int src_half, int pdl)
{
    quantize_block(src, gsc, planes, scales, src_stride, n_valid, n_kb, src_half, blockIdx.x / n_kb,
                   blockIdx.x % n_kb, threadIdx.x >> 5, 4, pdl);
}

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void bmma(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, int zero) {
    asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(zero));
}

struct Slot {
    u32 a[MT][4];
    uint4 b;
    float2 s;  // the block's scale and half its constant term
    int p;
};

// Sign words of unit (p, kb) for the warp's rows: a[m][hf] = word 8 kb + 2 q of row hf (g or g + 8)
// of tile m, a[m][2 + hf] the next word. Words past W_r (last block only) read as 0: they meet planes
// of zeros anyway, but must not be read past the tensor's end. ``src``: the signs (rows of path p
// ``path_stride`` words apart), in global memory or staged in shared memory (``STAGE``).
__device__ __forceinline__ u32 ld_word(const u32* p) {
#if STAGE
    return *p;
#else
    return __ldg(p);
#endif
}

__device__ __forceinline__ void load_a(
    Slot& S, const u32* __restrict__ src, int p, int kb, long path_stride, int W_r, int q, bool even,
    const int (&row_off)[MT][2])
{
#if TILED
    // tile order (``tile_order``): a whole unit's 16 rows x 8 words are 512 contiguous bytes, 16 a lane;
    // the tile's last, partial block follows row by row (row_off[m][0]: the tile's first word)
    const int n_full = W_r >> 3;
    if (kb < n_full) {
        #pragma unroll
        for (int m = 0; m < MT; ++m) {
            const u32* ptr = src + p * path_stride + row_off[m][0] + 128 * kb + 4 * (threadIdx.x & 31);
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(ptr));
            S.a[m][0] = v.x;
            S.a[m][1] = v.y;
            S.a[m][2] = v.z;
            S.a[m][3] = v.w;
        }
    } else {
        const int rem = W_r & 7, w0 = 2 * q;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int row = 8 * hf + (threadIdx.x >> 2 & 7);  // of the tile
                const u32* ptr = src + p * path_stride + row_off[m][0] + 128 * n_full + row * rem + w0;
                S.a[m][hf] = w0 < rem ? __ldg(ptr) : 0u;
                S.a[m][2 + hf] = w0 + 1 < rem ? __ldg(ptr + 1) : 0u;
            }
    }
    S.p = p;
    return;
#endif
    const u32* base = src + p * path_stride + 8 * kb + 2 * q;
    const int w0 = 8 * kb + 2 * q;
    if (8 * kb + 8 <= W_r) {
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const u32* ptr = base + row_off[m][hf];
                if (even) {
#if STAGE
                    const uint2 v = *reinterpret_cast<const uint2*>(ptr);
#else
                    const uint2 v = __ldg(reinterpret_cast<const uint2*>(ptr));
#endif
                    S.a[m][hf] = v.x;
                    S.a[m][2 + hf] = v.y;
                } else {
                    S.a[m][hf] = ld_word(ptr);
                    S.a[m][2 + hf] = ld_word(ptr + 1);
                }
            }
    } else {
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const u32* ptr = base + row_off[m][hf];
                S.a[m][hf] = w0 < W_r ? ld_word(ptr) : 0u;
                S.a[m][2 + hf] = w0 + 1 < W_r ? ld_word(ptr + 1) : 0u;
            }
    }
    S.p = p;
}

__device__ __forceinline__ void cp_async4(unsigned dst, const u32* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const u32* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void load_b(Slot& S, const u32* planes, const float2* scales, int ui, int lane) {
    S.b = __ldca(reinterpret_cast<const uint4*>(planes + (long)ui * 128) + lane);
    S.s = __ldca(scales + ui);
}

// tot += 2 h_p * acc for path p (the warp's sums of one path), acc = 0.
__device__ __forceinline__ void fold(
    float (&tot)[MT][2], float (&acc)[MT][2], const float (&hv)[PATHS][MT][2], int p)
{
    #pragma unroll
    for (int pp = 0; pp < PATHS; ++pp)
        if (pp == p)
            #pragma unroll
            for (int m = 0; m < MT; ++m)
                #pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    tot[m][hf] += 2.f * hv[pp][m][hf] * acc[m][hf];
                    acc[m][hf] = 0.f;
                }
}

// Stage 1 only (every path its own group) may quantize its own input and output instead of a launch
// each: with ``x_n`` > 0 the first programs to start (by ticket ``cnt[0]``) each make one block of the
// planes of x * g that all programs then wait for (``cnt[1]`` counts blocks done; a program only waits
// after its own block, so no wait depends on a program that has not started); with ``t_n`` > 0 the
// last program of each 256 rows of t (a ticket each, ``cnt[3 + ...]``) makes that block's planes for
// stage 2. The counters are zero between calls: the last program out (``cnt[2]``) clears the first three.
extern "C" __global__ void __launch_bounds__(RG * KS * 32) littlebit_bitserial_gemv(
    u32* planes, float2* scales, const u32* __restrict__ u,
    const u16* __restrict__ h, const u16* __restrict__ bias, void* __restrict__ out,
    int d_out, int W_r, int n_kb, int has_bias, int pdl, long out_stride, int out_f32,
    const u16* __restrict__ x, const u16* __restrict__ xg, int x_n, u32* __restrict__ t_planes,
    float2* __restrict__ t_scales, int t_n, int* cnt, int early)
{
    // ``early``: the next kernel may be scheduled at once, to stage what it does not wait for while
    // this one runs (its programs take SM room this grid does not need)
    if (pdl && early) asm volatile("griddepcontrol.launch_dependents;");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int rg = warp / KS, ks = warp % KS;
    const int row0 = blockIdx.x * (16 * MT * RG) + rg * 16 * MT;
    const long grp = blockIdx.y;  // grouped call: layer grp's tensors follow the ones before it
    constexpr int NW = RG * KS;
    __shared__ int s_flag;
    u32* const planes0 = planes;
    float2* const scales0 = scales;
    u += grp * PATHS * d_out * (long)W_r;
    h += grp * PATHS * d_out;
    planes += grp * PATHS * n_kb * 128;
    scales += grp * PATHS * n_kb;
    bias += grp * d_out;
    const bool even = (W_r & 1) == 0;

    int row_off[MT][2];
    float hv[PATHS][MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = min(row0 + m * 16 + hf * 8 + g, d_out - 1);  // rows past d_out: read, not written
            // tile order: the tile's first word (d_out is a multiple of 16)
            const int staged = rg * 16 * MT + m * 16 + hf * 8 + g;
            row_off[m][hf] = (TILED ? min(row0 + m * 16, d_out - 16) : STAGE ? staged : row) * W_r;
            #pragma unroll
            for (int pp = 0; pp < PATHS; ++pp) hv[pp][m][hf] = h2f(__ldg(h + pp * d_out + row));
        }
    // Per-lane plane weights: this thread's counts are planes 2q, 2q + 1 (first MMA) and 8 + 2q,
    // 9 + 2q (second); plane 15 (q = 3) is the sign plane, weight -2^15.
    const int w_lo = 1 << (2 * q), w_hi = 1 << (8 + 2 * q), hi_odd = q == 3 ? -2 : 2;

#if STAGE
    // The program's rows of each path are one contiguous block of words: copied whole into shared
    // memory with coalesced 16-byte cp.async, so the fragments' 8 rows per load hit shared memory,
    // not L1 lines. Rows past d_out stay unwritten; their sums are dropped.
    extern __shared__ u32 sA[];
    constexpr int R = 16 * MT * RG;
    const int blk0 = blockIdx.x * R;
    const int n_blk = min(R, d_out - blk0) * W_r;
    const bool vec = ((d_out * W_r) & 3) == 0 && ((blk0 * W_r) & 3) == 0;
    #pragma unroll
    for (int pp = 0; pp < PATHS; ++pp) {
        const u32* from = u + ((long)pp * d_out + blk0) * W_r;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(sA + pp * R * W_r);
        if (vec) {
            for (int i = 4 * threadIdx.x; i < n_blk; i += 4 * 32 * RG * KS) {
                if (i + 4 <= n_blk)
                    cp_async16(dst + 4 * i, from + i);
                else
                    for (int k = i; k < n_blk; ++k) cp_async4(dst + 4 * k, from + k);
            }
        } else {
            for (int i = threadIdx.x; i < n_blk; i += 32 * RG * KS) cp_async4(dst + 4 * i, from + i);
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    const u32* a_src = sA;
    const long a_path = (long)R * W_r;
#else
    const u32* a_src = u;
    const long a_path = (long)d_out * W_r;
#endif
    const int n_units = PATHS * n_kb;
    Slot S[DEPTH];
    int lp = 0, lkb = ks;  // the next unit to load, path-major, KS apart
    while (lkb >= n_kb && lp < PATHS) lkb -= n_kb, ++lp;
    #pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
        if (ks + d * KS < n_units) {
            load_a(S[d], a_src, lp, lkb, a_path, W_r, q, even, row_off);
            lkb += KS;
            while (lkb >= n_kb) lkb -= n_kb, ++lp;
        }
    }
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");  // planes are the kernel before's output
    if (x_n > 0) {
        const int n_xblk = gridDim.y * n_kb, n_prog = gridDim.x * gridDim.y;
        if (threadIdx.x == 0) s_flag = atomicAdd(cnt, 1);
        __syncthreads();
        const int tk = s_flag;
        if (tk < n_xblk) {  // blocks tk, tk + n_prog, ...: small grids have fewer programs than blocks
            if (warp < 4)
                for (int b = tk; b < n_xblk; b += n_prog)
                    quantize_block(
                        x, xg, planes0, scales0, 0, x_n, n_kb, 1, b / n_kb, b % n_kb, warp, min(NW, 4), 0);
            __syncthreads();
            if (threadIdx.x == 0) {
                __threadfence();
                atomicAdd(cnt + 1, (n_xblk - 1 - tk) / n_prog + 1);
            }
        }
        if (threadIdx.x == 0)  // its acquire makes the other programs' planes visible to this one
            while (ld_acquire(cnt + 1) < n_xblk) __nanosleep(32);
        __syncthreads();
    }
    #pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        if (ks + d * KS < n_units) load_b(S[d], planes, scales, ks + d * KS, lane);

    float acc[MT][2], tot[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = tot[m][0] = tot[m][1] = 0.f;
    int cur = 0;
    const int zero = 0;
    for (int it = ks; it < n_units; it += DEPTH * KS) {
        #pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int ui = it + d * KS;
            if (ui >= n_units) break;
            if (S[d].p != cur) {  // a path is done: fold its sums, h-scaled, into the totals
                fold(tot, acc, hv, cur);
                cur = S[d].p;
            }
            const float cq = q == 0 ? S[d].s.y : 0.f;  // once per row: the lanes' sums are added up
            #pragma unroll
            for (int m = 0; m < MT; ++m) {
                int lo[4], hi[4];
                bmma(lo, S[d].a[m], S[d].b.x, S[d].b.y, zero);
                bmma(hi, S[d].a[m], S[d].b.z, S[d].b.w, zero);
                const int c0 = (lo[0] + 2 * lo[1]) * w_lo + (hi[0] + hi_odd * hi[1]) * w_hi;
                const int c1 = (lo[2] + 2 * lo[3]) * w_lo + (hi[2] + hi_odd * hi[3]) * w_hi;
                acc[m][0] += S[d].s.x * (float)c0 - cq;
                acc[m][1] += S[d].s.x * (float)c1 - cq;
            }
            const int nu = ui + DEPTH * KS;
            if (nu < n_units) {
                load_a(S[d], a_src, lp, lkb, a_path, W_r, q, even, row_off);
                load_b(S[d], planes, scales, nu, lane);
                lkb += KS;
                while (lkb >= n_kb) lkb -= n_kb, ++lp;
            }
        }
    }
    fold(tot, acc, hv, cur);
    if (pdl && !early) asm volatile("griddepcontrol.launch_dependents;");

    __shared__ float part[RG * KS][16 * MT];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float v = tot[m][hf];
            v += __shfl_xor_sync(FULL, v, 1);
            v += __shfl_xor_sync(FULL, v, 2);
            if (q == 0) part[warp][m * 16 + hf * 8 + g] = v;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < RG * 16 * MT; i += RG * KS * 32) {
        const int r = i / (16 * MT), k = i % (16 * MT);
        const int row = blockIdx.x * (16 * MT * RG) + i;
        if (row < d_out) {
            float s = 0.f;
            #pragma unroll
            for (int w = 0; w < KS; ++w) s += part[r * KS + w][k];
            if (has_bias) s += h2f(bias[row]);
            if (out_f32)
                ((float*)out)[grp * out_stride + row] = s;
            else
                ((u16*)out)[grp * out_stride + row] = f2h(s);
        }
    }
    if (t_n > 0) {  // this program's rows of t are written: the last of a block of 256 makes its planes
        constexpr int PER = 256 / (16 * MT * RG);  // programs per block (the host checks it divides)
        const int kb = blockIdx.x / PER, n_tkb = (t_n + 255) / 256;
        const int n_here = min((int)gridDim.x - kb * PER, PER);
        int* tk = cnt + 3 + grp * n_tkb + kb;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            s_flag = atomicAdd(tk, 1) == n_here - 1;
        }
        __syncthreads();
        if (s_flag) {
            __threadfence();
            if (warp < 4)
                quantize_block(
                    out, nullptr, t_planes, t_scales, out_stride, t_n, n_tkb, 0, grp, kb, warp, min(NW, 4),
                    0);
            if (threadIdx.x == 0) *tk = 0;
        }
    }
    if (x_n > 0) {  // every program is past its wait on cnt[1] once all are out: clear for the next call
        __syncthreads();
        if (threadIdx.x == 0 && atomicAdd(cnt + 2, 1) == gridDim.x * gridDim.y - 1) {
            cnt[0] = 0;
            cnt[1] = 0;
            cnt[2] = 0;
        }
    }
}
"""


@dataclass(frozen=True)
class BitTile:
    """``MT`` 16-row tiles a warp, ``KS`` warps splitting the units of the same rows, ``RG`` such row
    groups per program, ``DEPTH`` units a warp has in flight."""

    mt: int = 1
    ks: int = 1
    rg: int = 4
    depth: int = 4
    stage: bool = False  # copy the program's sign rows to shared memory first (coalesced)
    tiled: bool = False  # the signs are in tile order (``packing.tile_order``)


def staged_bytes(tile: BitTile, paths: int, W: int) -> int:
    return paths * 16 * tile.mt * tile.rg * W * 4 if tile.stage else 0


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
    defs |= {"BF16": int(bf16), "STAGE": int(tile.stage), "TILED": int(tile.tiled)}
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
    """A stage-1 ``gemv`` that quantizes its own input or output instead of a ``quantize`` launch:
    when given, ``x`` (1, d_in) times each path's ``g`` (paths, d_in) into the input planes, and its
    output t (``out``, fp32) into the planes of ``t_ws`` (``workspace_floats`` of the paths and the
    rank's words). ``counters``: int32, at least ``counters_needed``, all zero (as the call leaves
    them)."""

    counters: torch.Tensor
    x: torch.Tensor | None = None
    g: torch.Tensor | None = None
    t_ws: torch.Tensor | None = None


def counters_needed(paths: int, rows: int) -> int:
    return 3 + paths * -(-rows // BLOCK)


def quantizes_output(tile: BitTile) -> bool:
    """A stage 1 of this tile can quantize t itself: its programs' rows tile the blocks of 256."""
    return BLOCK % (16 * tile.mt * tile.rg) == 0


def gemv(
    ws: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    W: int, paths: int, groups: int, tile: BitTile, pdl: bool, out_stride: int | None = None,
    fused: SelfQuantizing | None = None, early_dependents: bool = False,
) -> None:  # fmt: skip
    """out[grp * out_stride + i] = sum_p h_p[i] * (S_p v_p)[i] (+ bias[i]) for every row i of every
    group, v_p as ``quantize`` left it in ``ws`` (or as ``fused`` makes it). ``signs`` (groups * paths,
    rows, W) int32; ``h`` and ``bias`` (groups * paths, rows) fp16 or bf16; ``out`` contiguous, fp32 or
    the dtype of ``h``. Stage 2 is one call with ``paths`` 1-2 and ``groups`` layers; stage 1 one with
    ``paths`` 1 and every path its own group (h = l, out = t)."""
    planes, scales = split_workspace(ws, groups * paths, W)
    rows = h.shape[-1]
    if tile.tiled and (rows % 16 or tile.stage):
        raise ValueError(f"{tile}: tile order needs rows in multiples of 16 and no staging")
    func = _functions(tile, paths, h.dtype == torch.bfloat16, out.device.index or 0)[1]
    x_n = t_n = 0
    x = xg = cnt = t_planes = t_scales = None
    if fused is not None:
        if paths != 1 or out.dtype != torch.float32 or fused.counters.numel() < counters_needed(groups, rows):
            raise ValueError("a self-quantizing gemv is a stage 1: one path a group, fp32 t, enough counters")
        x, xg, cnt = fused.x, fused.g, fused.counters
        x_n = 0 if x is None else x.shape[-1]
        if fused.t_ws is not None:
            if not quantizes_output(tile):
                raise ValueError(f"{tile}: programs of {16 * tile.mt * tile.rg} rows do not tile blocks")
            t_planes, t_scales = split_workspace(fused.t_ws, groups, -(-rows // 32))
            t_n = rows
    args = [
        _nvrtc.ptr(planes), _nvrtc.ptr(scales), _nvrtc.ptr(signs), _nvrtc.ptr(h),
        _nvrtc.ptr(bias if bias is not None else h), _nvrtc.ptr(out), ctypes.c_int(rows), ctypes.c_int(W),
        ctypes.c_int(n_blocks(W)), ctypes.c_int(bias is not None), ctypes.c_int(pdl),
        ctypes.c_long(rows if out_stride is None else out_stride), ctypes.c_int(out.dtype == torch.float32),
        _nvrtc.ptr(x), _nvrtc.ptr(xg), ctypes.c_int(x_n), _nvrtc.ptr(t_planes), _nvrtc.ptr(t_scales),
        ctypes.c_int(t_n), _nvrtc.ptr(cnt), ctypes.c_int(early_dependents),
    ]  # fmt: skip
    grid = (-(-rows // (16 * tile.mt * tile.rg)), groups)
    _nvrtc.launch(func, grid, 32 * tile.rg * tile.ks, staged_bytes(tile, paths, W), args, out.device, pdl)


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


def _plane_bits(planes: torch.Tensor, nkb: int) -> torch.Tensor:
    """From the kernel's order back to the bit of each plane per entry: int64 (P, nkb, 256, 16)."""
    order = planes.reshape(-1, nkb, 8, 4, 4).to(torch.int64) & 0xFFFFFFFF  # (P, nkb, g, q, j)
    lo = torch.stack([order[..., 0], order[..., 1]], -1).flatten(-2)  # (P, nkb, g, word 0..7)
    hi = torch.stack([order[..., 2], order[..., 3]], -1).flatten(-2)
    words = torch.cat([lo, hi], 2)  # (P, nkb, plane k, word w)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=planes.device)) & 1  # (P, nkb, k, w, bit)
    return bits.permute(0, 1, 3, 4, 2).reshape(-1, nkb, BLOCK, 16)


def reference_dequantize(
    planes: torch.Tensor, scales: torch.Tensor, W: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What planes and scales in the kernel's order hold: (q int64 (P, blocks * 256), s * q fp64)."""
    nkb = n_blocks(W)
    weights = torch.tensor([int(w) for w in _PLANE_WEIGHTS], dtype=torch.int64, device=planes.device)
    q = (_plane_bits(planes, nkb) * weights).sum(-1)  # (P, nkb, 256)
    s = scales.reshape(-1, nkb, 2)[..., 0].double()
    return q.flatten(1), (q.double() * s[..., None]).flatten(1)


def reference_gemv(
    v: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, paths: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``quantize`` then ``gemv`` in fp64 on unpacked bits: (groups * rows,) for vectors ``v``
    (groups * paths, n) and ``signs`` (groups * paths, rows, W)."""
    G = signs.shape[0] // paths
    W = signs.shape[2]
    nkb = n_blocks(W)
    planes, scales = reference_quantize(v, W)
    pbits = _plane_bits(planes, nkb).double()
    sbits = (signs.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=v.device)) & 1
    sbits = sbits.flatten(-2).double()  # (P, rows, 32 W)
    sbits = torch.nn.functional.pad(sbits, (0, nkb * BLOCK - sbits.shape[-1])).view(
        -1, signs.shape[1], nkb, BLOCK
    )
    counts = torch.einsum("prkb,pkbn->prkn", sbits, pbits)  # (P, rows, nkb, 16)
    weights = torch.tensor(_PLANE_WEIGHTS, dtype=torch.float64, device=v.device)
    sc = scales.double()
    acc = (counts @ weights) * sc[:, None, :, 0] - sc[:, None, :, 1]  # (P, rows, nkb)
    y = (2 * h.double() * acc.sum(-1)).view(G, paths, -1).sum(1).flatten()
    return y if bias is None else y + bias.double().flatten()
