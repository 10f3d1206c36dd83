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
