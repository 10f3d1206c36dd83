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
// ``path_stride`` words apart).
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
                    const uint2 v = __ldg(reinterpret_cast<const uint2*>(ptr));
                    S.a[m][hf] = v.x;
                    S.a[m][2 + hf] = v.y;
                } else {
                    S.a[m][hf] = __ldg(ptr);
                    S.a[m][2 + hf] = __ldg(ptr + 1);
                }
            }
    } else {
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const u32* ptr = base + row_off[m][hf];
                S.a[m][hf] = w0 < W_r ? __ldg(ptr) : 0u;
                S.a[m][2 + hf] = w0 + 1 < W_r ? __ldg(ptr + 1) : 0u;
            }
    }
    S.p = p;
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

// Stage 1 only (every path its own group) may quantize its own output instead of a launch: with
// ``t_n`` > 0 the last program of each 256 rows of t (a ticket each, ``cnt[...]``, zero between calls)
// makes that block's planes for stage 2.
extern "C" __global__ void __launch_bounds__(RG * KS * 32) littlebit_bitserial_gemv(
    u32* planes, float2* scales, const u32* __restrict__ u,
    const u16* __restrict__ h, const u16* __restrict__ bias, void* __restrict__ out,
    int d_out, int W_r, int n_kb, int has_bias, int pdl, long out_stride, int out_f32,
    u32* __restrict__ t_planes, float2* __restrict__ t_scales, int t_n, int* cnt)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int rg = warp / KS, ks = warp % KS;
    const int row0 = blockIdx.x * (16 * MT * RG) + rg * 16 * MT;
    const long grp = blockIdx.y;  // grouped call: layer grp's tensors follow the ones before it
    constexpr int NW = RG * KS;
    __shared__ int s_flag;
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
            row_off[m][hf] = (TILED ? min(row0 + m * 16, d_out - 16) : row) * W_r;
            #pragma unroll
            for (int pp = 0; pp < PATHS; ++pp) hv[pp][m][hf] = h2f(__ldg(h + pp * d_out + row));
        }
    // Per-lane plane weights: this thread's counts are planes 2q, 2q + 1 (first MMA) and 8 + 2q,
    // 9 + 2q (second); plane 15 (q = 3) is the sign plane, weight -2^15.
    const int w_lo = 1 << (2 * q), w_hi = 1 << (8 + 2 * q), hi_odd = q == 3 ? -2 : 2;

    const u32* a_src = u;
    const long a_path = (long)d_out * W_r;
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
    if (pdl) asm volatile("griddepcontrol.launch_dependents;");

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
        int* tk = cnt + grp * n_tkb + kb;
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
}
