"""Packed CPU path for decoding: lookup tables over bytes of sign bits (T-MAC style).

For each group of 8 consecutive inputs the 256 signed sums (every sign pattern) are tabulated once per
call; a row of a sign matrix then costs one table read per byte of its packed words instead of 8
multiply-adds. Both stages work this way (stage 2 tabulates t).

The loop is a small C file compiled on first use with the system C compiler and called through ctypes,
because the per-op overhead of PyTorch alone exceeds a dense GEMV for the small layers of a 135M model.
Without a compiler, the same tables are gathered with ``torch.nn.functional.embedding_bag``. The same
file carries the many-token path's expansion of sign words into scaled factors (``kernels.cpu.gemm``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import torch

MAX_TOKENS = 16

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LB_X86 1
#endif

/* Groups of `bits` (4 or 8) consecutive values; entry c of a group's table adds value b when bit b of c
   is set and subtracts it otherwise. Built by doubling: the upper half of the first 2^(b+1) entries is
   the lower half plus 2 * value b. */
static void build_tables(const float *v, int64_t groups, int bits, float *tab) {
    const int size = 1 << bits;
    for (int64_t G = 0; G < groups; ++G) {
        const float *e = v + bits * G;
        float *t = tab + size * G;
        float s = 0.f;
        for (int b = 0; b < bits; ++b) s += e[b];
        t[0] = -s;
        for (int b = 0; b < bits; ++b) {
            const int half = 1 << b;
            const float d = 2.0f * e[b];
            for (int c = 0; c < half; ++c) t[half + c] = t[c] + d;
        }
    }
}

/* One table read per byte (8-bit groups) or per nibble (4-bit groups); four accumulators so that
   consecutive reads do not wait on one another. */
static float row_sum8(const uint8_t *by, const float *tab, int64_t n) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 += tab[256 * i + by[i]];
        a1 += tab[256 * (i + 1) + by[i + 1]];
        a2 += tab[256 * (i + 2) + by[i + 2]];
        a3 += tab[256 * (i + 3) + by[i + 3]];
    }
    for (; i < n; ++i) a0 += tab[256 * i + by[i]];
    return (a0 + a1) + (a2 + a3);
}

static float row_sum4(const uint8_t *by, const float *tab, int64_t n) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
        a0 += tab[32 * i + (by[i] & 15)];
        a1 += tab[32 * i + 16 + (by[i] >> 4)];
        a2 += tab[32 * i + 32 + (by[i + 1] & 15)];
        a3 += tab[32 * i + 48 + (by[i + 1] >> 4)];
    }
    for (; i < n; ++i) a0 += tab[32 * i + (by[i] & 15)] + tab[32 * i + 16 + (by[i] >> 4)];
    return (a0 + a1) + (a2 + a3);
}

#ifdef LB_X86
/* Sum of vec over the set bits of a row: 8 lanes test bits b..b+7 of a word at once and keep the values
   under set bits. Cheaper than tables for short stages, where building tables dominates. */
__attribute__((target("avx2"))) static float row_sum_set(const int32_t *words, const float *vec, int64_t w) {
    const __m256i m0 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i m1 = _mm256_slli_epi32(m0, 8), m2 = _mm256_slli_epi32(m0, 16);
    const __m256i m3 = _mm256_slli_epi32(m0, 24);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < w; ++k) {
        const __m256i wv = _mm256_set1_epi32(words[k]);
        const float *e = vec + 32 * k;
#define LB_PICK(m, off) _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(wv, m), m)), \
                                      _mm256_loadu_ps(e + off))
        a0 = _mm256_add_ps(a0, LB_PICK(m0, 0));
        a1 = _mm256_add_ps(a1, LB_PICK(m1, 8));
        a2 = _mm256_add_ps(a2, LB_PICK(m2, 16));
        a3 = _mm256_add_ps(a3, LB_PICK(m3, 24));
#undef LB_PICK
    }
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    return cached;
}
#endif

/* out[j] (+)= scale[j] * sum_i S[j, i] vec[i] for S (rows x n) packed in rows of w words; vec is zero past
   n up to 32 * w. An 8-bit table costs 32 adds per value to build against 4 for a 4-bit one and saves
   rows / 8 reads per value, so it pays off from about 224 rows; below that bit masks beat both. */
static void stage(const float *vec, int64_t n, const int32_t *words, int64_t w, int64_t rows,
                  const float *scale, float *tab, float *out, int accumulate) {
    const int bits = rows >= 224 ? 8 : 4;
    int masks = 0;
    float total = 0.f;
#ifdef LB_X86
    masks = rows < 224 && have_avx2();
#endif
    if (masks) {
        for (int64_t i = 0; i < 32 * w; ++i) total += vec[i];
    } else {
        build_tables(vec, (n + bits - 1) / bits, bits, tab);
    }
    const int64_t n_bytes = (n + 7) / 8;
    for (int64_t j = 0; j < rows; ++j) {
        float s;
#ifdef LB_X86
        if (masks)
            s = 2.f * row_sum_set(words + w * j, vec, w) - total;
        else
#endif
            s = bits == 8 ? row_sum8((const uint8_t *)(words + w * j), tab, n_bytes)
                          : row_sum4((const uint8_t *)(words + w * j), tab, n_bytes);
        out[j] = accumulate ? out[j] + scale[j] * s : scale[j] * s;
    }
}

/* For the many-token path (kernels/cpu/gemm.py): out[j, i] = rs[j] * cs[i] * (bit i of row j ? 1 : -1)
   for rows of w words, n columns (cs NULL: ones), rows ld floats apart. One pass that writes each
   factor entry once; the sign goes in as an xor of the float's sign bit from a per-byte table, which
   vectorises. */
static uint32_t sign_masks[256][8];
static int masks_ready = 0;

void littlebit_expand(const int32_t *words, int64_t rows, int64_t w, int64_t n, const float *rs,
                      const float *cs, float *out, int64_t ld) {
    if (!masks_ready) { /* idempotent: concurrent first calls write the same values */
        for (int c = 0; c < 256; ++c)
            for (int b = 0; b < 8; ++b) sign_masks[c][b] = ((c >> b) & 1) ? 0u : 0x80000000u;
        masks_ready = 1;
    }
    const int64_t full = n / 8;
    for (int64_t j = 0; j < rows; ++j) {
        const uint8_t *by = (const uint8_t *)(words + j * w);
        float *o = out + j * ld;
        const float s = rs[j];
        for (int64_t k = 0; k < full; ++k) {
            const uint32_t *m = sign_masks[by[k]];
            for (int b = 0; b < 8; ++b) {
                union { float f; uint32_t u; } v;
                v.f = cs ? s * cs[8 * k + b] : s;
                v.u ^= m[b];
                o[8 * k + b] = v.f;
            }
        }
        for (int64_t i = 8 * full; i < n; ++i) {
            const float v = cs ? s * cs[i] : s;
            o[i] = ((by[i / 8] >> (i % 8)) & 1) ? v : -v;
        }
    }
}

int littlebit_lut(const float *x, int64_t n_tok, int64_t d_in, int64_t d_out, int64_t rank, int64_t paths,
                  const int32_t *v, int64_t w_in, const int32_t *u, int64_t w_r, const float *h,
                  const float *l, const float *g, const float *bias, float *y) {
    const int64_t n_max = 32 * (w_in > w_r ? w_in : w_r) + 8;
    float *vec = malloc(sizeof(float) * n_max);
    float *tab = malloc(sizeof(float) * 32 * n_max);
    float *t = malloc(sizeof(float) * (rank + 1));
    if (!vec || !tab || !t) {
        free(vec);
        free(tab);
        free(t);
        return 1;
    }
    for (int64_t m = 0; m < n_tok; ++m) {
        float *ym = y + m * d_out;
        for (int64_t o = 0; o < d_out; ++o) ym[o] = bias ? bias[o] : 0.f;
        for (int64_t p = 0; p < paths; ++p) {
            /* Padding values are zero, so the -1 signs of clear padding bits add nothing. */
            memset(vec, 0, sizeof(float) * n_max);
            for (int64_t i = 0; i < d_in; ++i) vec[i] = x[m * d_in + i] * g[p * d_in + i];
            stage(vec, d_in, v + p * rank * w_in, w_in, rank, l + p * rank, tab, t, 0);
            memset(vec, 0, sizeof(float) * n_max);
            memcpy(vec, t, sizeof(float) * rank);
            stage(vec, rank, u + p * d_out * w_r, w_r, d_out, h + p * d_out, tab, ym, 1);
        }
    }
    free(vec);
    free(tab);
    free(t);
    return 0;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("LITTLEBIT_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "littlebit"


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "lut.c"
        src.write_text(_C_SOURCE)
        out = Path(tmp) / target.name
        subprocess.run(
            [cc, "-O3", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True
        )
        os.replace(out, target)  # atomic, so concurrent first uses never load a half-written file


def native_library() -> ctypes.CDLL | None:
    """The compiled loop, building it on first use; None when no C compiler works here."""
    global _lib, _tried
    if _tried:  # the common case, without the lock
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("LITTLEBIT_NO_NATIVE"):
            return None
        tag = hashlib.sha256((_C_SOURCE + sys.platform + os.uname().machine).encode()).hexdigest()[:16]
        path = _cache_dir() / f"cpu_lut_{tag}.so"
        try:
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError):
            return None
        fn = lib.littlebit_lut
        fn.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr]
        lib.littlebit_expand.restype = None
        lib.littlebit_expand.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64]
        _lib = lib
        return _lib


_f32_copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous fp32; copies of scales are kept (per tensor and version), since converting
    three small vectors per call costs about as much as the product of a small layer."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    key = id(t)
    hit = _f32_copies.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    f = t.detach().to(torch.float32).contiguous()
    _f32_copies[key] = (weakref.ref(t, lambda _, k=key: _f32_copies.pop(k, None)), t._version, f)
    return f


def _tables(vec: torch.Tensor) -> torch.Tensor:
    """(N, 8, M) groups -> (N, 256, M) signed sums, by doubling (entry c has bit b set in its upper half
    at step b). Elementwise on purpose: tiny matrix products go through a threaded BLAS whose start-up
    dwarfs them, and on a busy machine can stall for milliseconds."""
    t = -vec.sum(1, keepdim=True)
    for b in range(8):
        t = torch.cat([t, t + 2 * vec[:, b : b + 1]], dim=1)
    return t


def _lut_stage(vec: torch.Tensor, words: torch.Tensor, n: int, scale: torch.Tensor) -> torch.Tensor:
    """scale * (S @ vec) per path for S packed in ``words`` (P, rows, w); vec (P, n, M) -> (P, rows, M)."""
    P, rows, w = words.shape
    groups = (n + 7) // 8
    M = vec.shape[-1]
    if 8 * groups != n:
        vec = torch.nn.functional.pad(vec, (0, 0, 0, 8 * groups - n))
    tables = _tables(vec.reshape(P * groups, 8, M))
    idx = words.contiguous().view(torch.uint8).reshape(P, rows, 4 * w)[..., :groups].to(torch.int64)
    idx = idx + (torch.arange(P * groups, device=vec.device).view(P, 1, groups) * 256)
    psw = scale.to(torch.float32)[:, :, None].expand(P, rows, groups).reshape(P * rows, groups)
    out = torch.nn.functional.embedding_bag(
        idx.reshape(P * rows, groups), tables.reshape(-1, M), per_sample_weights=psw, mode="sum"
    )
    return out.view(P, rows, M)


def _torch_lut(x2: torch.Tensor, u, v, h, l, g) -> torch.Tensor:
    d_in, r = g.shape[-1], l.shape[-1]
    gx = g.to(torch.float32)[:, :, None] * x2.T[None]  # (P, d_in, M)
    t = _lut_stage(gx, v, d_in, l)
    return _lut_stage(t, u, r, h).sum(0).T


def littlebit_linear_cpu_lut(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The packed product on the CPU, computed in fp32 and returned in ``x.dtype``."""
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, d_in)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    M = x2.shape[0]
    lib = native_library()
    if lib is None:
        y = _torch_lut(x2, u_signs, v_signs, h, l, g)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], d_out)
    u = u_signs if u_signs.is_contiguous() else u_signs.contiguous()
    v = v_signs if v_signs.is_contiguous() else v_signs.contiguous()
    hf, lf, gf = _f32(h), _f32(l), _f32(g)
    bf = _f32(bias) if bias is not None else None
    y = torch.empty((M, d_out), dtype=torch.float32)
    rc = lib.littlebit_lut(
        x2.data_ptr(), M, d_in, d_out, r, P, v.data_ptr(), v.shape[-1], u.data_ptr(), u.shape[-1],
        hf.data_ptr(), lf.data_ptr(), gf.data_ptr(), bf.data_ptr() if bf is not None else None, y.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("littlebit cpu-lut: out of memory for the lookup tables")
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], d_out)


def cpu_tokens(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> int | None:
    """Tokens in a call the CPU backends can take (CPU tensors, fp32/bf16/fp16, int32 words), else None.

    Bytes of a word are read as bits 0-7, 8-15, ... which holds on little-endian hosts only.
    """
    ok = (
        sys.byteorder == "little"
        and x.device.type == "cpu"
        and u_signs.device.type == "cpu"
        and v_signs.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and u_signs.dtype == torch.int32
        and v_signs.dtype == torch.int32
        and x.shape[-1] > 0
    )
    return x.numel() // x.shape[-1] if ok else None


def accepts(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> bool:
    """A CPU call of at most ``MAX_TOKENS`` tokens (decoding)."""
    tokens = cpu_tokens(x, u_signs, v_signs)
    return tokens is not None and tokens <= MAX_TOKENS
