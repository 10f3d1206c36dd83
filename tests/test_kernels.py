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

from littlebit.ops import available_backends, littlebit_linear, littlebit_linear_reference, select_backend

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


def _workspaces_zero(tk) -> bool:
    return all(not ws.t.any() and not ws.counter.any() for ws in tk._WORKSPACES.values())


def _check_repeated_calls(tk, config=None):
    """Layers called again and again, two shapes in turn, on both paths. Stage 1 adds into a cached
    workspace, so a result is only right if every call before it left that workspace zero."""
    cfg = tk.KernelConfig(**config) if config else None
    layers = [make_layer(576, 40, 300, 2, torch.float16, DEVICE, seed=1)]
    layers.append(make_layer(100, 120, 40, 1, torch.float16, DEVICE, seed=2))
    calls = [(0, 1), (0, 1), (1, 1), (0, 1), (1, 5), (0, 5), (0, 5), (1, 1), (1, 1)]  # (layer, tokens)
    worst = 0.0
    for step, (which, m) in enumerate(calls):
        u, v, h, l, g, bias = layers[which]
        x = torch.randn(m, g.shape[-1], generator=torch.Generator().manual_seed(step)).half().to(DEVICE)
        y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
        worst = max(worst, rel_err(y, x, u, v, h, l, g, bias))
    if not _workspaces_zero(tk):
        raise AssertionError("a call left its workspace non-zero")
    return worst


def _check_two_launches(tk):
    """A call is stage 1 then stage 2 and nothing else: no prep launch, no reallocated workspace."""
    kernel_cls = type(tk._gemv_v_kernel)
    run = kernel_cls.run
    launched = []

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    u, v, h, l, g, bias = make_layer(576, 40, 300, 2, torch.float16, DEVICE, seed=3)
    worst = 0.0
    for m, stages in [(1, ["_gemv_v_kernel", "_gemv_u_kernel"]), (5, ["_tc_v_kernel", "_tc_u_kernel"])]:
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        tk.littlebit_linear_triton(x, u, v, h, l, g, bias)  # compiles, sizes the workspace
        buffers = {key: ws.t.data_ptr() for key, ws in tk._WORKSPACES.items()}
        launched.clear()
        kernel_cls.run = counting_run
        try:
            y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias)
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
        tk.littlebit_linear_triton(x, u, v, h, l, g, bias)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing stage 2 did not raise")
    finally:
        tk._gemv_u_kernel = stage2
    if seen != [True]:
        raise AssertionError(f"stage 1 did not write the workspace: {seen}")
    if not _workspaces_zero(tk):
        raise AssertionError("the workspace kept stage 1's sums")
    return rel_err(tk.littlebit_linear_triton(x, u, v, h, l, g, bias), x, u, v, h, l, g, bias)


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
CHECKS["repeated-calls"] = (_check_repeated_calls, ())
CHECKS["repeated-calls-fp16x2"] = (_check_repeated_calls, (_FP16X2,))
CHECKS["two-launches"] = (_check_two_launches, ())
CHECKS["zeroed-after-failure"] = (_check_zeroed_after_failure, ())


def run_checks() -> dict[str, float | str]:
    from littlebit.kernels import triton_littlebit as tk

    results: dict[str, float | str] = {}
    for name, (fn, args) in CHECKS.items():
        try:
            results[name] = fn(tk, *args)
        except Exception as e:  # reported by the test that owns the check
            results[name] = repr(e)
    return results


@pytest.fixture(scope="module")
def triton_results():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if ON_GPU:
        return run_checks()
    here = Path(__file__).resolve().parent
    code = (
        f"import json, sys; sys.path[:0] = [{str(here)!r}, {str(here.parent / 'src')!r}]; "
        "import test_kernels as t; print('RESULTS', json.dumps(t.run_checks()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_matches_reference(name, triton_results):
    err = triton_results[name]
    assert isinstance(err, float), err
    assert err < TOL


@pytest.mark.skipif(not ON_GPU, reason="the fp16x2 PTX decoding only runs on a GPU")
@pytest.mark.parametrize("asm", [False, True])
@pytest.mark.parametrize("m,d_in,r,d_out", [(1, 4096, 552, 4096), (4, 1000, 120, 576), (1, 11008, 296, 4096)])
def test_triton_gemv_decodings(asm, m, d_in, r, d_out):
    from littlebit.kernels import triton_littlebit as tk

    u, v, h, l, g, bias = make_layer(d_in, r, d_out, 2, torch.float16, DEVICE, seed=d_in + r)
    x = torch.randn(m, d_in).half().to(DEVICE)
    cfg = tk.KernelConfig(asm=asm, gemv_max_tokens=4)
    y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias, config=cfg)
    assert rel_err(y, x, u, v, h, l, g, bias) < TOL


@pytest.mark.skipif(not ON_GPU, reason="counts CUDA kernels")
@pytest.mark.parametrize("m", [1, 16])
def test_triton_two_kernels_per_call(m):
    from torch.profiler import ProfilerActivity, profile

    from littlebit.kernels import triton_littlebit as tk

    u, v, h, l, g, bias = make_layer(1000, 120, 576, 2, torch.float16, DEVICE, seed=11)
    x = torch.randn(m, 1000, device=DEVICE).half()
    tk.littlebit_linear_triton(x, u, v, h, l, g, bias)  # compiles, sizes the workspace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            y = tk.littlebit_linear_triton(x, u, v, h, l, g, bias)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 6, kernels
    assert rel_err(y, x, u, v, h, l, g, bias) < TOL


@pytest.mark.skipif(not ON_GPU, reason="captures CUDA graphs")
@pytest.mark.parametrize("warm_up", [True, False])
@pytest.mark.parametrize("m", [1, 16])
def test_triton_cuda_graph_replays(m, warm_up):
    """Replays of a captured call stay right (the workspace is zero again after each), whether the
    workspace was sized by a warm-up outside capture (as the benchmarks do) or inside the capture."""
    from littlebit.kernels import triton_littlebit as tk

    layers = [make_layer(1000, 120, 576, 2, torch.float16, DEVICE, seed=s) for s in (12, 13)]
    x = torch.randn(m, 1000, device=DEVICE).half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels
        for layer in layers:
            tk.littlebit_linear_triton(x, *layer)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not warm_up:
        tk._WORKSPACES.clear()
    shared = tk._WORKSPACES.get((x.device, None))  # the workspace of captured calls
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [tk.littlebit_linear_triton(x, *layer) for layer in layers]
    assert (tk._WORKSPACES[(x.device, None)] is shared) == warm_up  # allocated in the capture only if cold
    for step in range(3):
        x.copy_(torch.randn(m, 1000, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        for y, layer in zip(ys, layers, strict=True):
            assert rel_err(y, x, *layer) < TOL, step
    y = tk.littlebit_linear_triton(x, *layers[0])  # eager again, after the replays
    assert rel_err(y, x, *layers[0]) < TOL


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA tensors")
def test_triton_accepts():
    from littlebit.kernels import triton_littlebit as tk

    u, v, *_ = make_layer(40, 8, 24, 2, torch.float16, "cuda", seed=0)
    assert tk.accepts(torch.randn(3, 40, device="cuda").half(), u, v)
    assert not tk.accepts(torch.randn(65, 40, device="cuda").half(), u, v)
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
    from littlebit.kernels import cpu_lut

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
    from littlebit.kernels import cpu_lut

    u, v, h, l, g, bias = make_layer(300, 240, 260, 2, torch.float32, "cpu", seed=3)
    x = torch.randn(2, 5, 300)
    y = cpu_lut.littlebit_linear_cpu_lut(x, u, v, h, l, g, bias)
    assert y.shape == (2, 5, 260)
    assert rel_err(y.reshape(-1, 260), x.reshape(-1, 300), u, v, h, l, g, bias) < 1e-5


def test_backends_registered_and_selected():
    import littlebit.kernels as kernels

    kernels.register()
    assert "cpu-lut" in available_backends()
    u, v, h, l, g, bias = make_layer(100, 24, 40, 2, torch.float32, "cpu", seed=5)
    x = torch.randn(1, 100)
    assert select_backend(x, u, v) == "cpu-lut"
    assert select_backend(torch.randn(17, 100), u, v) != "cpu-lut"
    y = littlebit_linear(x, u, v, h, l, g, bias)
    assert rel_err(y, x, u, v, h, l, g, bias) < 1e-5
    if ON_GPU and kernels.triton_available():
        xg, dev = x.half().cuda(), [t.cuda() for t in (u, v, h, l, g, bias)]
        assert select_backend(xg, dev[0], dev[1]) == "triton"
        assert rel_err(littlebit_linear(xg, *dev), xg, *dev) < TOL
