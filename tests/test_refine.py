import itertools

import pytest
import torch

from littlebit.core.init import initialise, reconstruct, sign
from littlebit.core.refine import COVARIANCE_RIDGE, fit_columns, fit_latent_scale, fit_rows, refine


def spectral(m: int, n: int, seed: int) -> torch.Tensor:
    """Low rank plus noise, as trained weights are (white noise leaves nothing for signs to fit)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n) // 3
    low = torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen) / k**0.5
    return low + 0.3 * torch.randn(m, n, generator=gen)


def error(w, factors) -> float:
    return ((w - reconstruct(*factors)).norm() / w.norm()).item()


def one_path(w, rank, seed):
    f = initialise(w, rank, residual=False, method="itq", seed=seed)
    return f.u[0], f.v[0], f.h[0], f.l[0], f.g[0]


def stacked(path):
    return tuple(t[None] for t in path)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(48, 40), (17, 70), (90, 24)])
def test_each_round_lowers_the_error(shape, seed):
    w = spectral(*shape, seed)
    path = one_path(w, 8, seed)
    errors = [error(w, stacked(path))]
    for rounds in (1, 2, 4):
        errors.append(error(w, stacked(refine(w, *path, rounds=rounds))))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] * 0.99, errors  # and it actually moves


def test_no_round_keeps_the_factors():
    w = spectral(30, 20, 0)
    path = one_path(w, 6, 0)
    out = refine(w, *path, rounds=0)
    for a, b in zip(path, out, strict=True):
        assert torch.equal(sign(a), sign(b))
        assert torch.allclose(a.abs().clamp_min(1e-3), b.abs().clamp_min(1e-3))


def test_rows_end_at_a_single_flip_optimum_with_least_squares_scales():
    torch.manual_seed(1)
    m, n, r = 12, 30, 5
    w = torch.randn(m, n)
    s_other, l, scale_other = sign(torch.randn(n, r)), torch.rand(r) + 0.5, torch.rand(n) + 0.5
    s, scale = fit_rows(w, sign(torch.randn(m, r)), l, s_other, scale_other)
    basis = (l[:, None] * s_other.T) * scale_other  # r x n
    assert (scale >= 0).all()

    def best_error(row, signs):  # the error of a row with its least-squares scale
        x = signs @ basis
        return (w[row] - (w[row] @ x) / (x @ x) * x).square().sum()

    for i in range(m):
        x = s[i] @ basis
        assert torch.allclose(scale[i], (w[i] @ x).abs() / (x @ x), rtol=1e-4)
        here = best_error(i, s[i])
        for k in range(r):
            flipped = s[i].clone()
            flipped[k] = -flipped[k]
            assert here <= best_error(i, flipped) * (1 + 1e-5)
        # with r = 5 the exhaustive optimum is cheap: greedy flips are never far from it
        every = itertools.product((-1.0, 1.0), repeat=r)
        optimum = min(best_error(i, torch.tensor(b, dtype=w.dtype)) for b in every)
        assert here <= optimum * 1.5 + 1e-6


def test_latent_scale_is_the_least_squares_solution():
    torch.manual_seed(2)
    m, n, r = 9, 11, 4
    w = torch.randn(m, n)
    s_u, s_v = sign(torch.randn(m, r)), sign(torch.randn(n, r))
    h, g = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    l = fit_latent_scale(w, s_u, h, s_v, g)
    design = torch.stack([torch.outer(h * s_u[:, k], g * s_v[:, k]).flatten() for k in range(r)], dim=1)
    expected = torch.linalg.lstsq(design.double(), w.flatten().double()[:, None]).solution.squeeze(1)
    assert torch.allclose(l.double(), expected, rtol=1e-3, atol=1e-5)


def test_latents_carry_the_refitted_signs_and_keep_their_spread():
    w = spectral(40, 32, 3)
    u, v, h, l, g = one_path(w, 8, 3)
    u = u.clone()
    u[:, -1] = 0.0  # a zero latent must still be able to carry a -1
    ru, rv, rh, rl, rg = refine(w, u, v, h, l, g)
    assert (rh >= 0).all() and (rl >= 0).all() and (rg >= 0).all()
    assert torch.allclose(ru.abs()[:, :-1], u.abs()[:, :-1]) and torch.allclose(rv.abs(), v.abs())
    assert (ru[:, -1] != 0).all()


@pytest.mark.parametrize("residual", [True, False])
def test_refined_initialisation_fits_better_and_is_deterministic(residual):
    w = spectral(64, 48, 5)
    scale = torch.rand(48) + 0.5
    itq = initialise(w, 8, residual, "itq", seed=0, input_scale=scale)
    a = initialise(w, 8, residual, "itq-refined", seed=0, input_scale=scale)
    b = initialise(w, 8, residual, "itq-refined", seed=0, input_scale=scale)
    for name in ("u", "v", "h", "l", "g"):
        assert torch.equal(getattr(a, name), getattr(b, name))

    def weighted(f):
        return (((w - f.weight()) * scale).norm() / (w * scale).norm()).item()

    assert weighted(a) < weighted(itq)


def correlated(n: int, seed: int) -> torch.Tensor:
    """A second moment with strongly correlated features of unequal size, as layer inputs have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.6 * torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(4 * n, n, generator=gen) @ mix * (torch.rand(n, generator=gen) * 3 + 0.1)
    return x.T @ x / x.shape[0]


def output_error(w, w_hat, c) -> float:
    e = w - w_hat
    return (torch.trace(e @ c @ e.T) / torch.trace(w @ c @ w.T)).sqrt().item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(48, 40), (17, 70), (90, 24)])
def test_each_round_lowers_the_output_error_under_a_covariance(shape, seed):
    w = spectral(*shape, seed)
    c = correlated(shape[1], seed)
    c = c / torch.diagonal(c).mean() + COVARIANCE_RIDGE * torch.eye(shape[1])  # the metric refine uses
    path = one_path(w, 8, seed)
    errors = [output_error(w, reconstruct(*stacked(path)), c)]
    for rounds in (1, 2, 4):
        errors.append(output_error(w, reconstruct(*stacked(refine(w, *path, rounds, c))), c))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    # and it beats the Frobenius refit on the error it aims at
    assert errors[-1] < output_error(w, reconstruct(*stacked(refine(w, *path, rounds=4))), c), errors


def test_columns_under_an_identity_covariance_are_rows_of_the_transpose():
    """Without correlations the columns decouple: the blocked update is the exact per-column one."""
    torch.manual_seed(3)
    m, n, r = 20, 150, 6  # more columns than one block
    w = torch.randn(m, n)
    s_u, h, l = sign(torch.randn(m, r)), torch.rand(m) + 0.5, torch.rand(r) + 0.5
    s_v, g = sign(torch.randn(n, r)), torch.rand(n) + 0.5
    a = (h[:, None] * s_u) * l[None, :]
    got_s, got_g = fit_columns(w, a, s_v, g, torch.eye(n), block=64)
    want_s, want_g = fit_rows(w.T, s_v, l, s_u, h)
    assert torch.equal(got_s, want_s)
    assert torch.allclose(got_g, want_g, rtol=1e-4)


def test_a_column_block_that_would_raise_the_error_is_split():
    """Two identical input features: solved together from the same start, both columns would move
    the same way and overshoot; the joint check must refuse that and keep the error from rising."""
    torch.manual_seed(4)
    m, n, r = 16, 2, 3
    w = torch.randn(m, n)
    c = torch.ones(n, n) + 1e-3 * torch.eye(n)
    s_u, h, l = sign(torch.randn(m, r)), torch.rand(m) + 0.5, torch.rand(r) + 0.5
    a = (h[:, None] * s_u) * l[None, :]
    for _ in range(20):
        s_v, g = sign(torch.randn(n, r)), torch.rand(n) + 0.5
        before = output_error(w, a @ (s_v * g[:, None]).T, c)
        s_new, g_new = fit_columns(w, a, s_v, g, c)
        assert output_error(w, a @ (s_new * g_new[:, None]).T, c) <= before + 1e-6


def test_the_latent_scale_under_a_covariance_is_its_least_squares_solution():
    torch.manual_seed(5)
    m, n, r = 9, 11, 4
    w = torch.randn(m, n)
    c = correlated(n, 5)
    s_u, s_v = sign(torch.randn(m, r)), sign(torch.randn(n, r))
    h, g = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    l = fit_latent_scale(w, s_u, h, s_v, g, c)
    root = torch.linalg.cholesky(c.double())  # tr(E C E^T) = |E L|^2
    design = torch.stack(
        [(torch.outer(h * s_u[:, k], g * s_v[:, k]).double() @ root).flatten() for k in range(r)], dim=1
    )
    expected = torch.linalg.lstsq(design, (w.double() @ root).flatten()[:, None]).solution.squeeze(1)
    assert torch.allclose(l.double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("residual", [True, False])
def test_initialisation_with_an_input_covariance_fits_the_outputs_better(residual):
    w = spectral(64, 48, 6)
    c = correlated(48, 6)
    scale = torch.diagonal(c).sqrt()
    diagonal = initialise(w, 8, residual, "itq-refined", seed=0, input_scale=scale)
    full = initialise(w, 8, residual, "itq-refined", seed=0, input_scale=scale, input_covariance=c)
    again = initialise(w, 8, residual, "itq-refined", seed=0, input_scale=scale, input_covariance=c)
    for name in ("u", "v", "h", "l", "g"):
        assert torch.equal(getattr(full, name), getattr(again, name))
    assert output_error(w, full.weight(), c) < output_error(w, diagonal.weight(), c)
    with pytest.raises(ValueError, match="itq-refined"):
        initialise(w, 8, residual, "itq", input_covariance=c)
