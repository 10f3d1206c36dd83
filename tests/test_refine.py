import itertools

import pytest
import torch

from littlebit.core.init import initialise, reconstruct, sign
from littlebit.core.refine import fit_latent_scale, fit_rows, refine


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
