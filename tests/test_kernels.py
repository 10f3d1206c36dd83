"""Every fast backend against ``littlebit_linear_reference`` computed in fp32 from the same packed inputs.

Without a GPU the Triton kernels run in Triton's interpreter. TRITON_INTERPRET has to be set before
``triton`` itself is imported (its own library functions are jit-decorated at import), and another test
may already have imported it, so the interpreted checks run together in one child process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from littlebit.op import available_backends, littlebit_linear, littlebit_linear_reference, select_backend

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
TOKENS = [1, 3, 4, 5, 17, 64]
DTYPES = [torch.float16, torch.bfloat16]
# (d_in, r, d_out): widths and ranks off the block sizes; each d_in and each r appears twice
SHAPES = [
    (40, 8, 24),
    (100, 24, 100),
    (576, 40, 300),
    (1000, 120, 576),
    (100, 120, 40),
    (1000, 8, 100),
    (40, 40, 576),
    (576, 24, 24),
]
TOL = 1e-2


def make_layer(d_in, r, d_out, paths, dtype, device, seed):
    """Random packed layer; padding bits are random too, which every backend must ignore."""
    gen = torch.Generator().manual_seed(seed)

    def words(*shape):
        return torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)

    def scale(n, fan):
        return ((torch.rand(paths, n, generator=gen) + 0.5) / fan**0.5).to(dtype)

    v = words(paths, r, (d_in + 31) // 32)
    u = words(paths, d_out, (r + 31) // 32)
    h, l, g = scale(d_out, r), scale(r, d_in), scale(d_in, 1)
    bias = torch.randn(d_out, generator=gen).to(dtype)
    return [t.to(device) for t in (u, v, h, l, g, bias)]


def cuda_cpp_kernels(module, compile_one):
    """``triton_littlebit`` for tests of a CUDA C++ kernel module (``cuda_mma``, ``cuda_bitserial``):
    skipped without sm_80+ or NVRTC; a kernel that fails to compile or load (``compile_one``) fails."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    if torch.cuda.get_device_capability(0)[0] < 8:
        pytest.skip("mma.sync for fp16 and b1 needs sm_80+")
    try:
        module._nvrtc.nvrtc()
    except module.NvrtcUnavailable:
        pytest.skip("NVRTC unavailable")
    compile_one()
    assert module.available(0)
    return tk


def rel_err(y, x, u, v, h, l, g, bias):
    f = [t.float().cpu() for t in (x, h, l, g)]
    ref = littlebit_linear_reference(
        f[0], u.cpu(), v.cpu(), *f[1:], None if bias is None else bias.float().cpu()
    )
    return ((y.float().cpu() - ref).norm() / ref.norm()).item()


# ---- Triton: each check returns a relative error; on CPU they all run in one interpreted child -----


def _cases(offset):
    for i, m in enumerate(TOKENS):
        for j, dtype in enumerate(DTYPES):
            d_in, r, d_out = SHAPES[(2 * i + j + offset) % len(SHAPES)]
            yield m, d_in, r, d_out, 1 + (i + j + offset) % 2, dtype


def _check_case(tk, m, d_in, r, d_out, paths, dtype, config=None):
    seed = (m * 7919 + d_in * 104729 + r * 31 + d_out * 17 + paths) % 2**31
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, paths, dtype, DEVICE, seed)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    cfg = tk.KernelConfig(**config) if config else None
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    if y.shape != (m, d_out) or y.dtype != dtype or not torch.isfinite(y.float()).all():
        return float("inf")
    return rel_err(y, x, u, v, h, l, g, bias)


def _check_leading_dims(tk, m):
    u, v, h, l, g, _ = make_layer(100, 24, 40, 2, torch.float16, DEVICE, seed=m)
    x = torch.randn(2, m, 100).half().to(DEVICE)
    y = tk.littlebit_linear_triton(x, u, v, h, l, g)
    if y.shape != (2, m, 40):
        return float("inf")
    return rel_err(y.reshape(-1, 40), x.reshape(-1, 100), u, v, h, l, g, None)


def plane_bits(planes: torch.Tensor, nkb: int) -> torch.Tensor:
    """From ``cuda_bitserial``'s kernel order back to the bit of each plane per entry: int64 (P, nkb,
    256, 16)."""
    from littlebit.kernels.gpu import cuda_bitserial as bs

    order = planes.reshape(-1, nkb, 8, 4, 4).to(torch.int64) & 0xFFFFFFFF  # (P, nkb, g, q, j)
    lo = torch.stack([order[..., 0], order[..., 1]], -1).flatten(-2)  # (P, nkb, g, word 0..7)
    hi = torch.stack([order[..., 2], order[..., 3]], -1).flatten(-2)
    words = torch.cat([lo, hi], 2)  # (P, nkb, plane k, word w)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=planes.device)) & 1  # (P, nkb, k, w, bit)
    return bits.permute(0, 1, 3, 4, 2).reshape(-1, nkb, bs.BLOCK, 16)


def reference_dequantize(
    planes: torch.Tensor, scales: torch.Tensor, W: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``cuda_bitserial``'s planes and scales in the kernel's order hold: (q int64 (P, blocks *
    256), s * q fp64)."""
    from littlebit.kernels.gpu import cuda_bitserial as bs

    nkb = bs.n_blocks(W)
    weights = torch.tensor([int(w) for w in bs._PLANE_WEIGHTS], dtype=torch.int64, device=planes.device)
    q = (plane_bits(planes, nkb) * weights).sum(-1)  # (P, nkb, 256)
    s = scales.reshape(-1, nkb, 2)[..., 0].double()
    return q.flatten(1), (q.double() * s[..., None]).flatten(1)


def _check_stage1_planes(tk, d_in, r, paths, dtype):
    """The Triton stage 1 that ends in the bit-serial stage 2's planes (``_stage1_to_planes``): they
    hold t = l * S_V^T (g * x) quantized per block of 256 (each block's largest entry at 32767, the
    constant term matching, nothing past the rank), and every ticket is zero after. Called twice, so
    the second call meets the first's workspace. inf when a property fails, else t's relative error."""
    from littlebit.kernels.gpu import cuda_bitserial as bs

    u, v, h, l, g, _ = make_layer(d_in, r, 8, paths, dtype, DEVICE, seed=d_in + r)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(r)).to(dtype).to(DEVICE)
    signs = ((v.cpu().long().unsqueeze(-1) >> torch.arange(32)) & 1).flatten(-2)[..., :d_in].double() * 2 - 1
    gx = g.cpu().double() * x.cpu().double()
    t = l.cpu().double() * torch.einsum("prd,pd->pr", signs, gx)
    W_r = (r + 31) // 32
    sms = tk._num_sms(0) if ON_GPU else 4
    err = float("inf")
    for _ in range(2):
        region = tk._stage1_to_planes(x, v, l, g, tk.KernelConfig(), sms)
        planes, scales = (a.cpu() for a in bs.split_workspace(region, paths, W_r))
        q, got = reference_dequantize(planes, scales, W_r)
        qb = q.view(paths, -1, 256)
        pair = scales.view(paths, -1, 2)
        if not (qb.abs().amax(-1) == 32767).all() or q[:, r:].any():
            return float("inf")
        if not torch.allclose(pair[..., 1], 0.5 * pair[..., 0] * qb.sum(-1).float(), rtol=1e-6):
            return float("inf")
        assert_workspaces_clean(tk)
        err = ((got[:, :r] - t).norm() / t.norm()).item()
    return err


def _check_tiled(tk, m, d_in, r, d_out, dtype, config=None):
    """S_U in tile order (``packing.tile_order``) gives what row order gives, bit for bit (inf if not),
    on the tensor-core path (which reads it as it is) and the GEMV (a row-ordered copy); else the error."""
    from littlebit.core.packing import tile_order

    u, v, h, l, g, bias = make_layer(d_in, r, d_out, 2, dtype, DEVICE, seed=d_in + r + m)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    cfg = tk.KernelConfig(**config) if config else None
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    y_tiled = tk.littlebit_linear_triton(x, tile_order(u), v, h, l, g, bias, config=cfg, u_tiled=True)
    return rel_err(y, x, u, v, h, l, g, bias) if torch.equal(y, y_tiled) else float("inf")


# stage 1 of the GEMV writes t from partial sums (no zero t), on up to 4 tokens
REDUCE = {"gemv_reduce": True, "gemv_max_tokens": 4}


def _workspace_problem(key, ws) -> str | None:
    """Why ``ws`` is not in the state a call must find it in, or None.

    Atomics into t ("two"): t and the counter all zero. Bit-serial ("bits"): anything. Partial sums
    ("reduce"): every ticket zero, t anything.
    """
    if key[-1] == "bits":  # bit-serial calls write all they read (test_cuda_bitserial poisons it)
        return None
    t, state = ws.t.cpu(), ws.counter.cpu().tolist()
    if key[-1] == "reduce":
        return None if not any(state) else f"{key}: a ticket is non-zero"
    assert key[-1] == "two", key
    return None if not t.any() and not any(state) else f"{key}: t or counter non-zero"


def assert_workspaces_clean(tk) -> None:
    problems = [p for key, ws in tk._WORKSPACES.items() if (p := _workspace_problem(key, ws))]
    if problems:
        raise AssertionError("; ".join(problems))


def _check_repeated_calls(tk, config=None):
    """Layers called again and again, two shapes in turn, on both paths. Stage 1 adds into a cached
    workspace, so a result is only right if every call before it left (or made) its part zero."""
    cfg = tk.KernelConfig(**config) if config else None
    layers = [make_layer(576, 40, 300, 2, torch.float16, DEVICE, seed=1)]
    layers.append(make_layer(100, 120, 40, 1, torch.float16, DEVICE, seed=2))
    calls = [(0, 1), (0, 1), (1, 1), (0, 1), (1, 5), (0, 5), (0, 5), (1, 1), (1, 1)]  # (layer, tokens)
    calls += [(0, 17), (1, 1), (1, 2), (0, 1), (0, 17), (0, 17), (1, 1)]
    worst = 0.0
    for step, (which, m) in enumerate(calls):
        u, v, h, l, g, bias = layers[which]
        x = torch.randn(m, g.shape[-1], generator=torch.Generator().manual_seed(step)).half().to(DEVICE)
        y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
        worst = max(worst, rel_err(y, x, u, v, h, l, g, bias))
        assert_workspaces_clean(tk)
    return worst


def _check_launches(tk, config=None):
    """A call is stage 1 then stage 2 and nothing else: no prep launch, no reallocated workspace."""
    cfg = tk.KernelConfig(**config) if config else None
    plan = [(1, ["_gemv_v_kernel", "_gemv_u_kernel"]), (5, ["_tc_v_kernel", "_tc_u_kernel"])]
    kernel_cls = type(tk._gemv_v_kernel)
    run = kernel_cls.run
    launched = []

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    u, v, h, l, g, bias = make_layer(576, 40, 300, 2, torch.float16, DEVICE, seed=3)
    worst = 0.0
    for m, stages in plan:
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)  # compiles, sizes the workspace
        buffers = {key: ws.t.data_ptr() for key, ws in tk._WORKSPACES.items()}
        launched.clear()
        kernel_cls.run = counting_run
        try:
            y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
        finally:
            kernel_cls.run = run
        if launched != stages:
            raise AssertionError(f"{m} token(s): launched {launched}, expected {stages}")
        if {key: ws.t.data_ptr() for key, ws in tk._WORKSPACES.items()} != buffers:
            raise AssertionError(f"{m} token(s): the workspace was reallocated")
        worst = max(worst, rel_err(y, x, u, v, h, l, g, bias))
    return worst


def _check_zeroed_after_failure(tk):
    """Stage 2 failing to launch after stage 1 ran must not leave stage 1's sums in the workspace."""
    cfg = tk.KernelConfig()
    u, v, h, l, g, bias = make_layer(100, 24, 100, 2, torch.float16, DEVICE, seed=4)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    seen = []

    class FailingLaunch:
        def __getitem__(self, grid):
            def launch(t, *args, **kwargs):
                seen.append(bool(t.any()))  # stage 1 has added into t (ordered on the stream)
                raise RuntimeError("stage 2 failed")

            return launch

    stage2, tk._gemv_u_kernel = tk._gemv_u_kernel, FailingLaunch()
    try:
        tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing stage 2 did not raise")
    finally:
        tk._gemv_u_kernel = stage2
    if seen != [True]:
        raise AssertionError(f"stage 1 did not write the workspace: {seen}")
    assert_workspaces_clean(tk)
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    return rel_err(y, x, u, v, h, l, g, bias)


def _check_poisoned_workspace(tk, m, d_in, r, d_out, config):
    """Partial sums: t may hold anything between calls. With the workspace filled with NaN before the
    call, the result is only finite and right if stage 1 writes every entry stage 2 reads (the
    padding of the last word included) and nothing reads a partial slot it did not write."""
    cfg = tk.KernelConfig(**config)
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, 2, torch.float16, DEVICE, seed=r + d_in)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(r)).half().to(DEVICE)
    tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)  # creates the workspace
    poisoned = [ws.t.fill_(float("nan")) for key, ws in tk._WORKSPACES.items() if key[-1] == "reduce"]
    if not poisoned:
        raise AssertionError("no partial-sums workspace was used")
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    if not torch.isfinite(y.float()).all():
        return float("inf")
    return rel_err(y, x, u, v, h, l, g, bias)


def grouped_layers(d_in, r, d_out, paths, groups):
    """``groups`` random fp16 layers of one shape: (the layers, their tensors stacked along the path
    axis as a grouped call takes them, their biases side by side)."""
    layers = [make_layer(d_in, r, d_out, paths, torch.float16, DEVICE, seed=60 + j) for j in range(groups)]
    stacked = [torch.cat([layer[i] for layer in layers]) for i in range(5)]
    return layers, stacked, torch.cat([layer[5] for layer in layers])


def _check_grouped(tk, m, d_in, r, d_out, paths, groups, bias, config=None):
    """Layers of one shape on one input, stacked along the path axis, against each layer alone: the
    GEMV runs them in one pair of launches, the tensor-core path one after another."""
    cfg = tk.KernelConfig(**config) if config else None
    layers, stacked, b = grouped_layers(d_in, r, d_out, paths, groups)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    b = b if bias else None
    y = tk.littlebit_linear_triton(x, *stacked, b, config=cfg, groups=groups)
    if y.shape != (m, groups * d_out):
        return float("inf")
    errs = [
        rel_err(y[:, j * d_out : (j + 1) * d_out], x, *layer[:5], layer[5] if bias else None)
        for j, layer in enumerate(layers)
    ]
    assert_workspaces_clean(tk)
    return max(errs)


# every shape / token / dtype case once with the default config
CHECKS = {
    f"case-{'-'.join(map(str, c[:5]))}-{str(c[5])[6:]}": (_check_case, c) for c in [*_cases(0), *_cases(3)]
}
CHECKS.update({f"leading-dims-{m}": (_check_leading_dims, (m,)) for m in (2, 9)})
# The fp16x2 GEMV decoding (emulated under the interpreter) over several tokens, and wider TC tiles.
_FP16X2 = {"asm": True, "gemv_max_tokens": 4}
CHECKS.update(
    {
        f"fp16x2-{m}-{d_in}-{r}-{d_out}": (_check_case, (m, d_in, r, d_out, 2, torch.float16, _FP16X2))
        for m, (d_in, r, d_out) in [(1, SHAPES[3]), (3, SHAPES[2]), (4, SHAPES[6]), (2, SHAPES[1])]
    }
)
CHECKS["tc-128-rows"] = (
    _check_case,
    (17, 1000, 120, 300, 2, torch.bfloat16, {"tc_rows": 128, "tc_words": 4}),
)
# More shapes with the default config, on both token paths.
CHECKS.update(
    {
        f"two-launch-{c[0]}-{c[1]}-{c[2]}-{c[3]}-{str(c[5])[6:]}": (_check_case, c)
        for c in [(1, 1000, 120, 576, 2, torch.float16), (1, 100, 24, 100, 1, torch.bfloat16)]
        + [(5, 576, 40, 300, 2, torch.float16), (17, 1000, 8, 100, 1, torch.bfloat16)]
    }
)
CHECKS.update(
    {
        f"grouped-{m}-{d_in}-{r}-{d_out}-{paths}x{groups}": (
            _check_grouped,
            (m, d_in, r, d_out, paths, groups, bias, {"gemv_max_tokens": 4}),
        )
        for m, d_in, r, d_out, paths, groups, bias in [
            (1, 576, 40, 300, 2, 3, False),
            (3, 100, 120, 40, 1, 2, True),
            (1, 1000, 8, 576, 2, 2, True),
            (5, 576, 40, 300, 2, 3, True),
        ]
    }
)
# Partial sums: d_in = 4000 splits stage 1 over several programs per row block (the ticket path).
CHECKS.update(
    {
        f"reduce-{m}-{d_in}-{r}-{d_out}-{paths}-{str(dt)[6:]}": (
            _check_case,
            (m, d_in, r, d_out, paths, dt, REDUCE),
        )
        for m, d_in, r, d_out, paths, dt in [
            (1, 4000, 24, 100, 2, torch.float16),
            (3, 4000, 120, 40, 1, torch.bfloat16),
            (1, 576, 40, 300, 2, torch.float16),
            (2, 1000, 8, 576, 1, torch.float16),
        ]
    }
)
CHECKS.update(
    {
        f"reduce-fp16x2-{m}-{d_in}-{r}-{d_out}": (
            _check_case,
            (m, d_in, r, d_out, 2, torch.float16, {**REDUCE, "asm": True}),
        )
        for m, d_in, r, d_out in [
            (1, 4000, 72, 100),
            (3, 1000, 120, 576),
            (1, 576, 40, 300),
            (2, 4000, 8, 40),
        ]
    }
)
# words per row 4 (no whole block), 10 (one and a tail), 16 (no tail)
CHECKS.update(
    {
        f"tiled-{m}-{r}-{str(dt)[6:]}": (_check_tiled, (m, 96, r, 48, dt))
        for m, r, dt in [(4, 100, torch.float16), (3, 300, torch.bfloat16), (1, 300, torch.float16)]
    }
)
CHECKS["reduce-fp16x2-repeated-calls"] = (_check_repeated_calls, ({**REDUCE, "asm": True},))
CHECKS["reduce-fp16x2-grouped"] = (_check_grouped, (1, 4000, 72, 100, 2, 3, True, {**REDUCE, "asm": True}))
# fp32 t (modes 0 and 2, ranks off the word size) and fp16 pairs (mode 3), split and not split
CHECKS.update(
    {
        f"reduce-poisoned-{m}-{d_in}-{r}-{'fp16x2' if asm else 'plain'}": (
            _check_poisoned_workspace,
            (m, d_in, r, 100, {**REDUCE, "asm": asm}),
        )
        for m, d_in, r, asm in [
            (1, 4000, 24, False),
            (2, 4000, 8, True),
            (1, 4000, 40, True),
            (1, 576, 40, True),
        ]
    }
)
# stage 1 ending in bit planes: one split and two, a last block of 2 row blocks of 8, one block
CHECKS.update(
    {
        f"stage1-planes-{d_in}-{r}-{paths}-{str(dtype)[6:]}": (_check_stage1_planes, (d_in, r, paths, dtype))
        for d_in, r, paths, dtype in [
            (1000, 296, 2, torch.float16),
            (4000, 296, 2, torch.bfloat16),
            (4000, 40, 1, torch.float16),
        ]
    }
)
CHECKS["reduce-grouped"] = (_check_grouped, (1, 4000, 40, 100, 2, 3, True, REDUCE))
CHECKS["repeated-calls-reduce"] = (_check_repeated_calls, (REDUCE,))
CHECKS["reduce-launches"] = (_check_launches, (REDUCE,))
CHECKS["repeated-calls"] = (_check_repeated_calls, ())
CHECKS["repeated-calls-fp16x2"] = (_check_repeated_calls, (_FP16X2,))
CHECKS["two-launches"] = (_check_launches, ())
CHECKS["zeroed-after-failure"] = (_check_zeroed_after_failure, ())


def run_checks() -> dict[str, float | str]:
    from littlebit.kernels.gpu import triton_littlebit as tk

    results: dict[str, float | str] = {}
    for name, (fn, args) in CHECKS.items():
        try:
            results[name] = fn(tk, *args)
        except Exception as e:  # reported by the test that owns the check
            results[name] = repr(e)
    return results


def interpreted_results(module: str, run, timeout: int) -> dict[str, float | str]:
    """``run()`` here on a GPU; on a CPU, ``module.run_checks()`` in one child process under Triton's
    interpreter (TRITON_INTERPRET must be set before triton is imported)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if ON_GPU:
        return run()
    here = Path(__file__).resolve().parent
    code = (
        f"import json, sys; sys.path[:0] = [{str(here)!r}, {str(here.parent / 'src')!r}]; "
        f"import {module} as t; print('RESULTS', json.dumps(t.run_checks()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.fixture(scope="module")
def triton_results():
    return interpreted_results("test_kernels", run_checks, timeout=600)


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_matches_reference(name, triton_results):
    err = triton_results[name]
    assert isinstance(err, float), err
    assert err < TOL


@pytest.mark.skipif(not ON_GPU, reason="the fp16x2 PTX decoding only runs on a GPU")
@pytest.mark.parametrize("asm", [False, True])
@pytest.mark.parametrize("m,d_in,r,d_out", [(1, 4096, 552, 4096), (4, 1000, 120, 576), (1, 11008, 296, 4096)])
def test_triton_gemv_decodings(asm, m, d_in, r, d_out):
    from littlebit.kernels.gpu import triton_littlebit as tk

    u, v, h, l, g, bias = make_layer(d_in, r, d_out, 2, torch.float16, DEVICE, seed=d_in + r)
    x = torch.randn(m, d_in).half().to(DEVICE)
    cfg = tk.KernelConfig(asm=asm, gemv_max_tokens=4)
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    assert rel_err(y, x, u, v, h, l, g, bias) < TOL


@pytest.mark.skipif(not ON_GPU, reason="counts CUDA kernels")
@pytest.mark.parametrize("m", [1, 16])
def test_triton_kernels_per_call(m):
    from torch.profiler import ProfilerActivity, profile

    from littlebit.kernels.gpu import triton_littlebit as tk

    cfg = tk.KernelConfig()
    u, v, h, l, g, bias = make_layer(1000, 120, 576, 2, torch.float16, DEVICE, seed=11)
    x = torch.randn(m, 1000, device=DEVICE).half()
    tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)  # compiles, sizes the workspace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 6, kernels
    assert rel_err(y, x, u, v, h, l, g, bias) < TOL


@pytest.mark.skipif(not ON_GPU, reason="runs the kernels on real layer shapes")
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"pdl": False},
        REDUCE,
    ],
)
def test_triton_many_calls_large(config):
    """Real shapes, where stage 2 is scheduled while stage 1 still runs (PDL): 40 calls in turn over
    three layers and both paths."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    cfg = tk.KernelConfig(**config)
    layers = [
        make_layer(d_in, r, d_out, 2, torch.float16, DEVICE, seed=d_in + r)
        for d_in, r, d_out in [(4096, 544, 4096), (8192, 296, 11008), (4096, 1000, 1024)]
    ]
    for step in range(40):
        layer = layers[step % 3]
        m = (1, 1, 16, 5)[step % 4]
        x = torch.randn(m, layer[4].shape[-1], device=DEVICE).half()
        y = tk.littlebit_linear_triton(x, *layer, config=cfg)
        assert rel_err(y, x, *layer) < TOL, step
    torch.cuda.synchronize()
    assert_workspaces_clean(tk)


@pytest.mark.skipif(not ON_GPU, reason="captures CUDA graphs")
@pytest.mark.parametrize("scheme", ["two", "reduce"])
@pytest.mark.parametrize("warm_up", [True, False])
@pytest.mark.parametrize("m", [1, 16])
def test_triton_cuda_graph_replays(m, warm_up, scheme):
    """Replays of captured calls stay right (the workspace is left as a call must find it after
    each), whether the workspace was sized by a warm-up outside capture (as the benchmarks do) or
    inside the capture. Three calls per graph."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    cfg = tk.KernelConfig(**{"two": {}, "reduce": REDUCE}[scheme])
    # partial sums: d_in wide enough that stage 1 splits (tickets taken and reset in every replay)
    d_in = 4096 if scheme == "reduce" else 1000
    if scheme == "reduce" and m > cfg.gemv_max_tokens:
        scheme = "two"  # the tensor-core path keeps the zero-t workspace
    layers = [make_layer(d_in, 120, 576, 2, torch.float16, DEVICE, seed=s) for s in (12, 13, 14)]
    x = torch.randn(m, d_in, device=DEVICE).half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels
        for layer in layers:
            tk.littlebit_linear_triton(x, *layer, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not warm_up:
        tk._WORKSPACES.clear()
    key = (x.device, None, scheme)
    shared = tk._WORKSPACES.get(key)  # the workspace of captured calls
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [tk.littlebit_linear_triton(x, *layer, config=cfg) for layer in layers]
    assert (tk._WORKSPACES[key] is shared) == warm_up  # allocated in the capture only if cold
    for step in range(4):
        x.copy_(torch.randn(m, d_in, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        for y, layer in zip(ys, layers, strict=True):
            assert rel_err(y, x, *layer) < TOL, step
        assert_workspaces_clean(tk)
    y = tk.littlebit_linear_triton(x, *layers[0], config=cfg)  # eager again, after the replays
    assert rel_err(y, x, *layers[0]) < TOL


@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("reduce", [False, True, "mma"])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("m", [1, 16])
def test_triton_chained_calls_wait_for_their_input(m, graph, reduce):
    """Each call's input is the previous call's output, as in a model. With programmatic dependent
    launch a stage may start before the kernel that writes its input ends; it must wait for it, or
    it reads a stale input (each output is checked against the reference on the input it got)."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    # "mma": stage 2 on tensor cores (cuda_mma) for the one-token calls, a PDL dependent of stage 1
    cfg = tk.KernelConfig(**(REDUCE if reduce else {}), stage2_mma=reduce == "mma")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert tk._pdl(torch.empty(1, device=DEVICE), cfg), "PDL should be on by default on sm_90+"
    layers = [make_layer(2048, 200 + 40 * i, 2048, 2, torch.float16, DEVICE, seed=50 + i) for i in range(12)]
    x0 = torch.randn(m, 2048, device=DEVICE).half()

    def chain():  # [(input, output)] per layer
        pairs, x = [], x0
        for layer in layers:
            y = tk.littlebit_linear_triton(x, *layer, config=cfg)
            pairs.append((x, y))
            x = torch.nn.functional.layer_norm(y, (2048,))  # keeps values in range; a kernel in between
        return pairs

    pairs = chain()  # compiles; sizes the workspace
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            pairs = chain()
    for step in range(3):
        x0.copy_(torch.randn(m, 2048, device=DEVICE).half())
        if graph:
            g.replay()
        else:
            pairs = chain()
        torch.cuda.synchronize()
        for i, ((x, y), layer) in enumerate(zip(pairs, layers, strict=True)):
            assert rel_err(y, x, *layer) < TOL, (step, i)
    assert_workspaces_clean(tk)


@pytest.mark.skipif(not ON_GPU, reason="races only show on a GPU")
@pytest.mark.parametrize("m,d_in,r,d_out", [(1, 8192, 296, 4096), (3, 4096, 552, 1024)])
def test_triton_gemv_partial_sums_are_deterministic(m, d_in, r, d_out):
    """Stage 1 split over d_in and summed by the last program of each row block in a fixed order:
    repeated calls give the same bits, and the last program saw every partial (the result is right)."""
    from littlebit.kernels.gpu import triton_littlebit as tk

    cfg = tk.KernelConfig(**REDUCE)
    layer = make_layer(d_in, r, d_out, 2, torch.float16, DEVICE, seed=7)
    x = torch.randn(m, d_in, device=DEVICE).half()
    first = tk.littlebit_linear_triton(x, *layer, config=cfg)
    assert rel_err(first, x, *layer) < TOL
    for _ in range(50):
        assert torch.equal(tk.littlebit_linear_triton(x, *layer, config=cfg), first)
    assert_workspaces_clean(tk)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_gemv_stage2_tile_small_layers_take_fewer_warps():
    tk = importlib.import_module("littlebit.kernels.gpu.triton_littlebit")
    K = tk.KernelConfig
    # 4096x4096 at 0.55 BPW (17-word rows) on 132 SMs: the same 512 programs, one warp of 8 rows a thread
    assert tk._stage2_tile(4096, 17, 1, K(), 132) == (32, 8, 1)
    assert tk._stage2_tile(4096, 17, 1, K(rows_u_small=4), 132) == (32, 8, 2)
    assert tk._stage2_tile(4096, 17, 1, K(), 132, reduce=True) == (32, 8, 2)  # slower after partial sums
    # the row-length boundary, on a tile the rule would change (5000 rows, 16-word steps: 313 programs)
    assert tk._stage2_tile(5000, 17, 1, K(words_u=16), 132) == (16, 16, 1)
    assert tk._stage2_tile(5000, 16, 1, K(words_u=16), 132) == (16, 16, 2)
    assert tk._stage2_tile(5000, 12, 1, K(words_u=16), 132) == (16, 16, 2)
    assert tk._stage2_tile(4096, 17, 1, K(rows_u_small=6), 132)[2] == 1  # warps stay a power of two
    for d_out in (24, 300, 576, 4096, 11008, 28672):
        for w_r in (1, 5, 10, 16, 17, 32, 99):
            for groups in (1, 3):
                b2, bo, warps = tk._stage2_tile(d_out, w_r, groups, K(), 132)
                ob2, obo, owarps = tk._stage2_tile(d_out, w_r, groups, K(rows_u_small=4), 132)
                assert (b2, bo) == (ob2, obo), "the grid must not change"
                assert 1 <= warps <= owarps
                rows_per_thread = bo * b2 // (32 * warps)
                assert rows_per_thread <= 8 or warps == owarps
                if w_r <= 16:
                    assert warps == owarps, "short rows keep their tile"
                if groups * -(-d_out // bo) >= 2 * 132 and bo == tk._row_tile(d_out, b2, 4, 4)[0]:
                    assert warps == owarps, "layers that fill the GPU keep their tile"


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_mma_stage2_tile_rule():
    tk = importlib.import_module("littlebit.kernels.gpu.triton_littlebit")
    K = tk.KernelConfig

    def tile(d_out, w_r, groups=1, cfg=None):
        return tk._mma_tile(d_out, w_r, 2, groups, cfg or K(), 132)

    def as_tuple(t):
        return (t.mt, t.wpt, t.warps)

    # the rule's picks on the H100 grid's layers (benchmarks/results/kernels_mma_tiles.json)
    assert as_tuple(tile(28672, 10)) == (4, 1, 4)  # 8192x28672 at 0.1 BPW
    assert as_tuple(tile(28672, 99)) == (2, 1, 8)  # 8192x28672 at 1.0 BPW
    assert as_tuple(tile(4096, 17)) == (1, 2, 8)  # 4096x4096 at 0.55 BPW
    assert as_tuple(tile(11008, 25)) == (2, 1, 8)
    assert as_tuple(tile(4096, 14)) == (4, 1, 8)  # 11008x4096 at 0.3 BPW
    assert as_tuple(tile(4096, 17, groups=3)) == (2, 1, 8)  # grouped q, k, v: many rows
    # the boundaries: 17-word rows, 4 * SMs 16-row tiles (8448 rows), 6 units (12-word rows, 2 paths)
    assert as_tuple(tile(4096, 16)) == (4, 1, 8)
    assert as_tuple(tile(8448, 20)) == (1, 2, 8)
    assert as_tuple(tile(8464, 20)) == (2, 1, 8)
    assert as_tuple(tile(28672, 12)) == (4, 1, 4)
    assert as_tuple(tile(28672, 13)) == (2, 1, 8)
    # each setting overrides its own part only
    assert as_tuple(tile(28672, 99, cfg=K(mma_rows=1, mma_warps=2))) == (1, 1, 2)
    for d_out in (24, 576, 4096, 11008, 28672):
        for w_r in (1, 4, 12, 13, 16, 17, 99):
            t = tile(d_out, w_r)
            assert t.mt * t.wpt * t.warps in (16, 32)
            if w_r <= 12:  # 2 paths of at most 3 units of 4 words: 4 warps, not 8 with idle ones
                assert t.warps == 4, (d_out, w_r, t)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA tensors")
def test_triton_accepts():
    from littlebit.kernels.gpu import triton_littlebit as tk

    u, v, *_ = make_layer(40, 8, 24, 2, torch.float16, "cuda", seed=0)
    assert tk.accepts(torch.randn(3, 40, device="cuda").half(), u, v)
    assert tk.accepts(torch.randn(65, 40, device="cuda").half(), u, v)  # many tokens: the prefill kernels
    assert not tk.accepts(torch.randn(1, 40, device="cuda"), u, v)
    assert not tk.accepts(torch.randn(1, 40).half(), u.cpu(), v.cpu())


# ---- CPU path -------------------------------------------------------------------------------------

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpu_cases():
    for i, m in enumerate([1, 3, 4, 5, 16]):
        for j, dtype in enumerate(CPU_DTYPES):
            for k in range(2):
                d_in, r, d_out = SHAPES[(3 * i + j + 4 * k) % len(SHAPES)]
                yield m, d_in, r, d_out, 1 + (i + j + k) % 2, dtype


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("m,d_in,r,d_out,paths,dtype", list(_cpu_cases()))
def test_cpu_lut_matches_reference(native, m, d_in, r, d_out, paths, dtype, monkeypatch):
    from littlebit.kernels.cpu import lut as cpu_lut

    if native and cpu_lut.native_library() is None:
        pytest.skip("no C compiler here")
    if not native:
        monkeypatch.setattr(cpu_lut, "native_library", lambda: None)
    seed = hash((m, d_in, r, d_out, paths, str(dtype), 7)) % 2**31
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, paths, torch.float16, "cpu", seed)
    x = torch.randn(m, d_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = cpu_lut.littlebit_linear_cpu_lut(x, u, v, h, l, g, bias if m % 2 else None)
    assert y.shape == (m, d_out) and y.dtype == dtype
    assert rel_err(y, x, u, v, h, l, g, bias if m % 2 else None) < TOL


def test_cpu_lut_rank_above_table_threshold():
    """Stages with >= 224 rows take the 8-bit tables; the small cases above take masks / 4-bit tables."""
    from littlebit.kernels.cpu import lut as cpu_lut

    u, v, h, l, g, bias = make_layer(300, 240, 260, 2, torch.float32, "cpu", seed=3)
    x = torch.randn(2, 5, 300)
    y = cpu_lut.littlebit_linear_cpu_lut(x, u, v, h, l, g, bias)
    assert y.shape == (2, 5, 260)
    assert rel_err(y.reshape(-1, 260), x.reshape(-1, 300), u, v, h, l, g, bias) < 1e-5


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("m,d_in,r,d_out,paths,dtype", [(17, *SHAPES[i % 8], 1 + i % 2, d) for i, d in
                                                          enumerate(CPU_DTYPES * 3)])  # fmt: skip
def test_cpu_gemm_matches_reference(native, m, d_in, r, d_out, paths, dtype, monkeypatch):
    from littlebit.kernels.cpu import gemm as cpu_gemm
    from littlebit.kernels.cpu import lut as cpu_lut

    if native and cpu_lut.native_library() is None:
        pytest.skip("no C compiler here")
    if not native:  # the expansion without the C library
        monkeypatch.setattr(cpu_gemm, "native_library", lambda: None)

    seed = hash((m, d_in, r, d_out, paths, str(dtype), 11)) % 2**31
    u, v, h, l, g, bias = make_layer(d_in, r, d_out, paths, torch.float16, "cpu", seed)
    x = torch.randn(2, m, d_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = bias if paths == 2 else None
    y = cpu_gemm.littlebit_linear_cpu_gemm(x, u, v, h, l, g, b)
    assert y.shape == (2, m, d_out) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else TOL
    assert rel_err(y.reshape(-1, d_out), x.reshape(-1, d_in), u, v, h, l, g, b) < tol


def test_cpu_gemm_expands_in_blocks(monkeypatch):
    """Factors over ``_CHUNK`` entries are expanded a block of rows at a time; same result."""
    from littlebit.kernels.cpu import gemm as cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_CHUNK", 1000)
    u, v, h, l, g, bias = make_layer(100, 120, 40, 2, torch.float16, "cpu", seed=4)
    x = torch.randn(20, 100)
    y = cpu_gemm.littlebit_linear_cpu_gemm(x, u, v, h, l, g, bias)
    assert rel_err(y, x, u, v, h, l, g, bias) < 1e-5


def test_backends_registered_and_selected():
    import littlebit.kernels as kernels

    kernels.register()
    assert "cpu-lut" in available_backends()
    u, v, h, l, g, bias = make_layer(100, 24, 40, 2, torch.float32, "cpu", seed=5)
    x = torch.randn(1, 100)
    assert select_backend(x, u, v) == "cpu-lut"
    assert select_backend(torch.randn(17, 100), u, v) == "cpu-gemm"
    y = littlebit_linear(x, u, v, h, l, g, bias)
    assert rel_err(y, x, u, v, h, l, g, bias) < 1e-5
    if ON_GPU and kernels.triton_available():
        xg, dev = x.half().cuda(), [t.cuda() for t in (u, v, h, l, g, bias)]
        assert select_backend(xg, dev[0], dev[1]) == "triton"
        assert rel_err(littlebit_linear(xg, *dev), xg, *dev) < TOL
