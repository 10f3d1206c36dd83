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
                a[j][m][hf] = W >= W_r ? 0u : __ldg(up + row_off[m][hf] + W);
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
            row_off[m][hf] = (long)rows[m][hf] * W_r;
        }

    float acc[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = 0.f;

    const u32* a_src = u;
    const long a_path = (long)d_out * W_r;
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
