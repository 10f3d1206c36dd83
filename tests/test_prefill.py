"""The prefill kernels (65 tokens and more) against ``littlebit_linear_reference`` in fp32.

As in test_kernels.py: without a GPU the checks run in Triton's interpreter, together in one child
process with TRITON_INTERPRET=1 (it must be set before triton is imported). Token counts, widths and
ranks are off the tile sizes; padding bits of the sign words are random.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, HAVE_TRITON, TOL, interpreted_results, make_layer, rel_err

from littlebit.core.packing import tile_order


def _run(tk, m, d_in, r, d_out, paths, dtype, bias=True, config=None, tiled=False, groups=1):
    seed = (m * 7919 + d_in * 104729 + r * 31 + d_out * 17 + paths + groups) % 2**31
    layers = [make_layer(d_in, r, d_out, paths, dtype, DEVICE, seed + j) for j in range(groups)]
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(seed + 99)).to(dtype).to(DEVICE)
    # the prefill kernels unless a case asks for the GEMM path (``GEMM_CASES``)
    cfg = tk.KernelConfig(**{"gemm_min_tokens": 1 << 30, **(config or {})})
    u, v, h, l, g = (torch.cat([layer[i] for layer in layers]) for i in range(5))
    b = torch.cat([layer[5] for layer in layers]) if bias else None
    y = tk.littlebit_linear_triton(
        x, tile_order(u) if tiled else u, v, h, l, g, b, config=cfg, groups=groups, u_tiled=tiled
    )
    if y.shape != (m, groups * d_out) or y.dtype != dtype or not torch.isfinite(y.float()).all():
        return float("inf")
    errs = [
        rel_err(y[:, j * d_out : (j + 1) * d_out], x, *layers[j][:5], layers[j][5] if bias else None)
        for j in range(groups)
    ]
    return max(errs)


F16, BF16 = torch.float16, torch.bfloat16
# name: (m, d_in, r, d_out, paths, dtype, kwargs)
CASES = {
    "65-f16-p2": (65, 100, 40, 72, 2, F16, {}),
    "65-bf16-p1": (65, 40, 24, 100, 1, BF16, {}),
    "130-f16-p2-nobias": (130, 300, 120, 200, 2, F16, {"bias": False}),
    "130-bf16-p2": (130, 576, 40, 300, 2, BF16, {}),
    "200-f16-rank-over-tile": (200, 100, 136, 40, 2, F16, {}),
    # d_in split, the partial sums added between the stages; token blocks of 64, rows of 128
    "split-d_in": (70, 1000, 40, 60, 2, F16, {"config": {"prefill_waves": 64.0}}),
    "tiles-64-128-4words": (
        150, 330, 72, 90, 2, BF16,
        {"config": {"prefill_tokens": 64, "prefill_rows": 128, "prefill_out": 64, "prefill_words": 4}},
    ),
    "tiled-u": (97, 200, 72, 48, 2, F16, {"tiled": True}),
    "grouped": (80, 120, 40, 56, 2, BF16, {"groups": 3}),
    # the threshold itself: 65 tokens take prefill, fewer the tensor-core path (both checked)
    "min-tokens-lowered": (20, 100, 40, 72, 2, F16, {"config": {"prefill_min_tokens": 2}}),
    "bf16-130-tokens": (130, 300, 120, 200, 2, BF16, {}),
    # pre-scaled: 4 splits of an input width that ends inside a word, one path
    "split-d_in-p1": (66, 1111, 56, 90, 1, BF16, {"config": {"prefill_waves": 64.0}}),
}  # fmt: skip
# The factors expanded per call and two GEMMs (``kernels.gpu.gemm``): widths and ranks off the
# expansion's 32 x 256 blocks and off whole words, one and two paths, grouped layers, the threshold.
_GEMM = {"gemm_min_tokens": 128}
GEMM_CASES = {
    "gemm-128-f16-p2": (128, 100, 40, 72, 2, F16, {"config": _GEMM}),
    "gemm-130-bf16-p1-nobias": (130, 300, 24, 200, 1, BF16, {"bias": False, "config": _GEMM}),
    "gemm-wide": (129, 600, 136, 290, 2, BF16, {"config": _GEMM}),
    # 10 words a row: one block of 8 in fragment order, then a tail of 2
    "gemm-tiled-u": (140, 200, 300, 48, 2, F16, {"tiled": True, "config": _GEMM}),
    "gemm-grouped": (150, 120, 40, 56, 2, BF16, {"groups": 3, "config": _GEMM}),
    "gemm-min-tokens-lowered": (3, 100, 40, 72, 2, F16, {"config": {"gemm_min_tokens": 2}}),
    "gemm-grouped-p1": (150, 120, 40, 56, 1, BF16, {"groups": 3, "config": _GEMM}),
}  # fmt: skip


if HAVE_TRITON:  # a kernel that stores the decoded tile (module level: jit code sees module globals)
    import triton
    import triton.language as tl

    from littlebit.kernels.gpu._tensorcore import _sign_tile, sign_ones

    @triton.jit
    def _decode(w_ptr, o_ptr, ones, BR: tl.constexpr, BKW: tl.constexpr, DT: tl.constexpr):
        r, c, e = tl.arange(0, BR), tl.arange(0, BKW), tl.arange(0, BKW * 32)
        w = tl.load(w_ptr + r[:, None] * BKW + c[None, :])
        s = _sign_tile(w, ones, BR, BKW, DT)
        tl.store(o_ptr + r[:, None] * (BKW * 32) + e[None, :], s.to(tl.float32))


def _check_sign_tile(dtype) -> float:
    """The decoded +-1 tile in fp16 and bf16 (pair order) against ``unpack_signs``: 0.0 when equal."""
    from littlebit.core.packing import unpack_signs

    w = torch.randint(-(2**31), 2**31, (16, 2), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    w = w.to(torch.int32).to(DEVICE)
    out = torch.empty(16, 64, device=DEVICE)
    dt = tl.float16 if dtype == F16 else tl.bfloat16
    _decode[(1,)](w, out, sign_ones(dt), BR=16, BKW=2, DT=dt)
    # column 32k + 2i + j holds bit i + 16j of word k
    order = [32 * k + i + 16 * j for k in range(2) for i in range(16) for j in range(2)]
    return 0.0 if torch.equal(out.cpu(), unpack_signs(w.cpu(), 64)[:, order]) else float("inf")


def _check_factors() -> float:
    """The expanded factors (S_U row-ordered and tile-ordered) against ``unpack_signs`` with the scales
    multiplied in, in fp32: their largest absolute difference (0.0 when every entry, padding bits
    ignored, is in its place)."""
    from littlebit.core.packing import unpack_signs
    from littlebit.kernels.gpu.gemm import expanded_factors

    d_in, r, d_out = 300, 300, 290
    u, v, h, l, g, _ = make_layer(d_in, r, d_out, 2, torch.float32, DEVICE, seed=5)
    a, b = expanded_factors(u, v, h, l, g, torch.float32)
    tiled = tile_order(u[:, :288])
    _, b_tiled = expanded_factors(tiled, v, h[:, :288], l, g, torch.float32, u_tiled=True)
    ref_a = torch.cat([unpack_signs(v[p].cpu(), d_in) * l[p].cpu()[:, None] * g[p].cpu() for p in range(2)])
    ref_b = torch.cat([unpack_signs(u[p].cpu(), r) * h[p].cpu()[:, None] for p in range(2)], dim=1)
    diffs = [a.cpu() - ref_a, b.cpu() - ref_b, b_tiled.cpu() - ref_b[:288]]
    return max(d.abs().max().item() for d in diffs)


def _check_kv_cache_factors() -> float:
    """The latent KV cache's factors of a packed layer by the Triton expansion (what it uses on the
    GPU) against its own unpacking on the CPU, S_U row-ordered and tile-ordered: largest difference."""
    from littlebit.runtime.kvcache import _expanded_on_gpu, _folded_factors
    from littlebit.runtime.packed import PackedLittleBitLinear

    d_in, r, d_out = 200, 300, 96  # 10 words a row of S_U: tile order differs from row order
    proj = PackedLittleBitLinear(d_in, d_out, r, 2, scale_dtype=torch.float32)
    tensors = make_layer(d_in, r, d_out, 2, torch.float32, "cpu", 9)[:5]
    for name, t in zip(("u_signs", "v_signs", "h", "l", "g"), tensors, strict=True):
        setattr(proj, name, t)
    diffs = []
    for tiled in (False, True):
        proj.tile_u_signs(tiled)
        ref = _folded_factors(proj, torch.float32)
        got = _expanded_on_gpu(proj.to(DEVICE), torch.float32)
        proj.to("cpu")
        diffs += [(g.cpu() - e).abs().max().item() for g, e in zip(got, ref, strict=True)]
    return max(diffs)


def _check_scale_x() -> float:
    """``_pf_scale_x_kernel`` into a NaN-filled buffer, from x with a row stride wider than d_in, two
    paths, a width that ends inside a word, fp32 and fp16: largest difference from g * x rounded once,
    in the decoded columns' order, and zeros in the last word's padding (0.0 when exact)."""
    from littlebit.kernels.gpu.prefill import _pf_scale_x_kernel

    worst = 0.0
    for dtype in (torch.float32, F16):
        gen = torch.Generator().manual_seed(11)
        m, d_in, P = 21, 70, 2
        wide = torch.randn(m, d_in + 9, generator=gen).to(dtype)
        x = wide[:, :d_in]
        g = (torch.rand(P, d_in, generator=gen) + 0.5).half()
        kp = 32 * ((d_in + 31) // 32)
        xg = torch.full((P, m, kp), float("nan"), dtype=dtype, device=DEVICE)
        xd = wide.to(DEVICE)[:, :d_in]
        _pf_scale_x_kernel[(2, 1, P)](xd, g.to(DEVICE), xg, m, d_in, kp, xd.stride(0), BM=16, BE=256)
        ref = torch.zeros(P, m, kp, dtype=dtype)
        # the decoded tile's column 32k + 2i + j holds bit i + 16j of word k (``_sign_tile``)
        slots = torch.tensor([32 * (e // 32) + 2 * (e % 16) + (e % 32) // 16 for e in range(d_in)])
        ref[:, :, slots] = (x.float()[None] * g.float()[:, None, :]).to(dtype)
        got = xg.cpu()
        if torch.isnan(got).any():
            return float("inf")
        worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return worst


def run_checks() -> dict[str, float | str]:
    from littlebit.kernels.gpu import triton_littlebit as tk

    results: dict[str, float | str] = {}
    for dtype in (F16, BF16):
        name = f"sign-tile-{str(dtype)[6:]}"
        try:
            results[name] = _check_sign_tile(dtype)
        except Exception as e:  # reported by the test that owns the check
            results[name] = repr(e)
    checks = {
        "gemm-factors": _check_factors,
        "kv-cache-factors": _check_kv_cache_factors,
        "scale-x": _check_scale_x,
    }
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as e:  # reported by the test that owns the check
            results[name] = repr(e)
    for name, (m, d_in, r, d_out, paths, dtype, kw) in {**CASES, **GEMM_CASES}.items():
        try:
            results[name] = _run(tk, m, d_in, r, d_out, paths, dtype, **kw)
        except Exception as e:  # reported by the test that owns the check
            results[name] = repr(e)
    return results


@pytest.fixture(scope="module")
def prefill_results():
    return interpreted_results("test_prefill", run_checks, timeout=900)


@pytest.mark.parametrize(
    "name",
    [
        *(
            "sign-tile-float16",
            "sign-tile-bfloat16",
            "gemm-factors",
            "kv-cache-factors",
        ),
        *CASES,
        *GEMM_CASES,
    ],
)
def test_prefill_matches_reference(name, prefill_results):
    err = prefill_results[name]
    assert isinstance(err, float), err
    assert err < TOL


def test_prefill_scaled_input_is_exact(prefill_results):
    assert prefill_results["scale-x"] == 0.0


def test_prefill_routing():
    from littlebit.kernels.gpu.config import KernelConfig
    from littlebit.kernels.gpu.route import kernel_family

    cfg = KernelConfig()
    assert [kernel_family(m, cfg) for m in (1, 2, 64, 65, 127, 128, 8192)] == [
        "gemv", "tensor-core", "tensor-core", "prefill", "prefill", "gemm", "gemm"
    ]  # fmt: skip


def test_prefill_tile_rule():
    from littlebit.kernels.gpu.config import KernelConfig
    from littlebit.kernels.gpu.prefill import prefill_tile

    cfg = KernelConfig()
    # 2048 tokens of 8192x28672 at 0.1 BPW on 132 SMs: a low rank takes 64x64 tiles with 4 warps,
    # 320 stage-1 programs: d_in not split
    bm, br, bo, words, warps, chunk, n_split = prefill_tile(2048, 296, 256, 28672, 2, cfg, 132)
    assert (bm, br, bo, warps, n_split, chunk) == (64, 64, 128, 4, 1, 256)
    # the same tokens of 4096x11008 at 1.0 BPW (rank 1376): square 128 tiles, 8 warps
    bm, br, bo, words, warps, chunk, n_split = prefill_tile(2048, 1376, 128, 11008, 2, cfg, 132)
    assert (bm, br, bo, warps) == (128, 128, 128, 8)
    # 128 tokens of a 4096-wide layer: 64-token blocks, d_in split as far as it goes (4)
    bm, br, bo, words, warps, chunk, n_split = prefill_tile(128, 296, 128, 4096, 2, cfg, 132)
    assert (bm, n_split) == (64, 4) and chunk * n_split >= 128
