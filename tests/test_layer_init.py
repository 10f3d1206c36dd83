import pytest
import torch
from torch import nn

from littlebit.core.init import initialise, joint_itq, reconstruct, sign, truncated_svd
from littlebit.core.layer import LittleBitLinear, SmoothSign, STESign


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_smooth_sign_forward_and_gradient():
    x = torch.tensor([-0.5, -0.001, 0.0, 0.002, 3.0], requires_grad=True)
    y = SmoothSign.apply(x, 100.0)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    expected = 100.0 * (1 - torch.tanh(100.0 * x.detach()) ** 2)
    assert torch.allclose(x.grad, expected)


def test_ste_sign_gradient_is_clipped():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.9, 1.5], requires_grad=True)
    STESign.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_dense_reconstruction(residual, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(72, 40, bias=True)
    layer = LittleBitLinear.from_linear(linear, rank=16, residual=residual)
    x = torch.randn(3, 5, 72)
    w = layer.factors().weight()
    ref = x.double() @ w.double().T + linear.bias.double()
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 5, 40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out.double(), ref) < tol
    assert layer.weight is None and isinstance(layer, nn.Linear)


def test_gradients_reach_latents_and_scales():
    torch.manual_seed(0)
    layer = LittleBitLinear.from_linear(nn.Linear(32, 24), rank=8)
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    for name in ("u", "v", "h", "l", "g", "bias"):
        assert getattr(layer, name).grad is not None, name
        assert torch.isfinite(getattr(layer, name).grad).all()


def test_residual_path_reduces_error_and_rank_helps():
    torch.manual_seed(0)
    w = torch.randn(96, 128) @ torch.diag(torch.linspace(2, 0.1, 128))
    e1 = rel(initialise(w, 16, residual=False).weight(), w)
    e2 = rel(initialise(w, 16, residual=True).weight(), w)
    e3 = rel(initialise(w, 48, residual=True).weight(), w)
    assert e2 < e1 < 1.0 and e3 < e2


def _low_rank_plus_noise(d_out: int, d_in: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = torch.arange(1, 65, dtype=torch.float32).pow(-0.5)
    low = (torch.randn(d_out, 64, generator=g) * s) @ torch.randn(64, d_in, generator=g)
    return low / low.norm() + torch.randn(d_out, d_in, generator=g) / (d_out * d_in) ** 0.5


def test_randomized_svd_is_deterministic_and_ignores_the_global_rng(monkeypatch):
    import littlebit.core.init

    monkeypatch.setattr(littlebit.core.init, "EXACT_SVD_MAX_DIM", 64)  # take the randomized path cheaply
    w = _low_rank_plus_noise(300, 200)
    assert littlebit.core.init.use_randomized_svd(w.shape, 32)
    torch.manual_seed(1)
    a = initialise(w, 32, seed=3)
    torch.manual_seed(2)  # a different global state must not change the sketch
    b = initialise(w, 32, seed=3)
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in "uvhlg")
    c = initialise(w, 32, seed=4)
    assert not torch.equal(a.u, c.u)  # the seed does reach the sketch


def test_randomized_svd_is_close_to_exact(monkeypatch):
    import littlebit.core.init

    w = _low_rank_plus_noise(512, 640)
    exact = initialise(w, 64)
    _, s_exact, _ = truncated_svd(w, 64, seed=0)
    monkeypatch.setattr(littlebit.core.init, "EXACT_SVD_MAX_DIM", 256)
    assert littlebit.core.init.use_randomized_svd(w.shape, 64)
    assert not littlebit.core.init.use_randomized_svd(w.shape, 200)  # rank too large a share: exact
    fast = initialise(w, 64)
    _, s_fast, _ = truncated_svd(w, 64, seed=0)
    assert rel(s_fast, s_exact) < 0.01
    e_exact, e_fast = rel(exact.weight(), w), rel(fast.weight(), w)
    assert abs(e_fast - e_exact) < 0.01 * e_exact


def test_joint_itq_keeps_product_and_fits_signs_better():
    torch.manual_seed(0)
    u, v = torch.randn(200, 24), torch.randn(150, 24)
    u2, v2 = joint_itq(u, v, iters=30)
    assert rel(u2 @ v2.T, u @ v.T) < 1e-4
    x, x2 = torch.cat([u, v]), torch.cat([u2, v2])

    def sign_fit(m):  # distance between m and its best per-column scaled sign
        s = sign(m)
        scale = (m * s).sum(0) / s.pow(2).sum(0)
        return rel(s * scale, m)

    assert sign_fit(x2) < sign_fit(x)
    w = u @ v.T
    assert rel(initialise(w, 24, method="itq").weight(), w) < rel(initialise(w, 24).weight(), w)


def test_input_scale_weights_the_fit():
    torch.manual_seed(0)
    w = torch.randn(64, 80)
    scale = torch.ones(80)
    scale[:8] = 50.0  # a few loud input features, as in real activations
    x = torch.randn(256, 80) * scale
    plain = initialise(w, 16).weight()
    aware = initialise(w, 16, input_scale=scale).weight()
    assert rel(x @ aware.T, x @ w.T) < rel(x @ plain.T, x @ w.T)


def test_reconstruct_uses_sign_zero_positive():
    u = torch.zeros(1, 2, 1)
    v = torch.zeros(1, 3, 1)
    w = reconstruct(u, v, torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 3))
    assert torch.equal(w, torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_forward():
    layer = LittleBitLinear.from_linear(nn.Linear(64, 48), rank=8).cuda()
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    assert layer(x).shape == (2, 48)
