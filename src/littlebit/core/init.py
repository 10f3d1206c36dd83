"""Initialising the factors: Dual-SVID (the paper), Joint-ITQ (a learned rotation before signs), and
Joint-ITQ with its signs and scales then refitted to the weight (``refine``).

All return real-valued latent factors whose signs are the binary matrices, plus the three scale
vectors fitted to the latent magnitudes, for one or two (residual) paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from littlebit.core.refine import refine

# Exact SVD up to this smaller side (every recorded small-model number used it); above it, and for
# ranks up to RANDOMIZED_MAX_RANK_FRACTION of that side, a randomized range finder with Gram-based
# rank-1 scale fits is faster at nearly the same reconstruction error: on 2 CPU threads 1.2-23x faster,
# 0.05-0.40 % above the exact error (benchmarks/init_svd.py, init_svd_cpu.json).
EXACT_SVD_MAX_DIM = 2048
RANDOMIZED_MAX_RANK_FRACTION = 0.25
# Extra sketch columns and power iterations: the residual path's spectrum is nearly flat, and each
# iteration sharpens its decay by two powers.
OVERSAMPLING = 16
POWER_ITERATIONS = 4


@dataclass
class Factors:
    """Stacked over paths: u (P, d_out, r), v (P, d_in, r), h (P, d_out), l (P, r), g (P, d_in)."""

    u: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    l: torch.Tensor
    g: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The dense matrix the binarised factors represent (for checks only: it is d_out x d_in)."""
        return reconstruct(self.u, self.v, self.h, self.l, self.g)


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, as the packed format stores it."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def reconstruct(
    u: torch.Tensor, v: torch.Tensor, h: torch.Tensor, l: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    w = 0
    for p in range(u.shape[0]):
        w = w + (h[p, :, None] * sign(u[p]) * l[p]) @ (sign(v[p]) * g[p, :, None]).T
    return w


def _svd_by_gram(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets from the eigenvectors of the smaller Gram matrix, in float64.

    Much faster than a full SVD for the few hundred leading triplets Dual-SVID needs, and float64
    keeps the leading ones accurate (the squared condition number only hurts the tail, unused here).
    """
    tall = w.shape[0] >= w.shape[1]
    a = (w if tall else w.T).double()
    evals, evecs = torch.linalg.eigh(a.T @ a)
    order = torch.argsort(evals, descending=True)[:rank]
    s = evals[order].clamp_min(0).sqrt()
    v = evecs[:, order]
    u = (a @ v) / s.clamp_min(torch.finfo(torch.float64).tiny ** 0.5)
    u, v = (u, v) if tall else (v, u)
    return u.to(w.dtype), s.to(w.dtype), v.to(w.dtype)


def use_randomized_svd(shape: tuple[int, int], rank: int) -> bool:
    """Whether ``truncated_svd`` sketches a matrix of ``shape`` at ``rank`` instead of solving exactly."""
    side = min(shape)
    return side > EXACT_SVD_MAX_DIM and rank <= side * RANDOMIZED_MAX_RANK_FRACTION


def truncated_svd(w: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets ``(U, S, V)``: exact for small matrices, randomized for large."""
    rank = min(rank, *w.shape)
    if use_randomized_svd(w.shape, rank):
        return randomized_svd(w, rank, seed)
    return _svd_by_gram(w, rank)


def randomized_svd(w: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets from a Gaussian sketch of ``w``'s range (Halko, Martinsson, Tropp 2011).

    The sketch comes from a generator seeded with ``seed`` on the CPU, so the result does not depend
    on the global RNG or on what ran before (the streamed and in-memory conversions agree). Each power
    iteration sharpens the spectrum's decay by two powers; re-orthonormalising after every product
    keeps the small directions from drowning in float32 rounding.
    """
    k = min(rank + OVERSAMPLING, *w.shape)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(w.shape[1], k, generator=generator, dtype=w.dtype).to(w.device)
    q = torch.linalg.qr(w @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    # w ~ q (q^T w): the k x n projection is small enough for the Gram route to be exact and quick
    u_small, s, v = _svd_by_gram(q.T @ w, rank)
    return q @ u_small, s, v


def rank1_magnitudes(a: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 fit ``|a| ~ x y^T`` with x, y >= 0 (Perron vectors of a nonnegative matrix).

    ``exact=False`` takes the leading pair from the Gram matrix instead of a full SVD of which only
    one triplet is kept; the small-model path keeps the SVD so its recorded numbers stay put.
    """
    if exact:
        u, s, vh = torch.linalg.svd(a.abs(), full_matrices=False)
        left, s0, right = u[:, 0], s[0], vh[0]
    else:
        u, s, v = _svd_by_gram(a.abs(), 1)
        left, s0, right = u[:, 0], s[0], v[:, 0]
    root = s0.sqrt()
    return left.abs() * root, right.abs() * root


def joint_itq(u: torch.Tensor, v: torch.Tensor, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the latent factors by one r x r orthogonal R so that their signs fit them better.

    ``(u R)(v R)^T = u v^T``, so the product is unchanged; R solves the orthogonal Procrustes
    problem between the stacked factors and their signs, alternating with the signs themselves.
    """
    x = torch.cat([u, v], dim=0)
    r = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    prev = None
    for _ in range(iters):
        b = sign(x @ r)
        if prev is not None and torch.equal(b, prev):
            break  # same signs give the same R: a fixed point, every further iteration repeats it
        r, prev = orthogonal_polar(x.T @ b), b
    if x.is_cuda:  # make the Newton-Schulz result orthogonal to working precision
        r = orthogonal_polar(r, exact=True)
    return u @ r, v @ r


def orthogonal_polar(m: torch.Tensor, exact: bool | None = None, iters: int = 14) -> torch.Tensor:
    """The orthogonal factor of ``m``'s polar decomposition (the Procrustes solution).

    On a GPU a small SVD costs milliseconds of solver overhead and ITQ needs one per iteration for
    every layer, so there the factor comes from Newton-Schulz iterations (matrix products only);
    the CPU, where LAPACK is quick on small matrices, uses the SVD.
    """
    exact = not m.is_cuda if exact is None else exact
    if exact:
        left, _, right_h = torch.linalg.svd(m, full_matrices=False)
        return left @ right_h
    # |m^T m|_F^(1/2) bounds the largest singular value (so all land in (0, 1], where the iteration
    # converges) far more tightly than |m|_F, which saves iterations for a wide, even spectrum.
    y = m / (m.T @ m).norm().sqrt().clamp_min(1e-30)
    eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    for _ in range(iters):
        y = y @ (1.5 * eye - 0.5 * (y.T @ y))
    return y


def _one_path(w: torch.Tensor, rank: int, seed: int, itq: bool, itq_iters: int):
    exact = not use_randomized_svd(w.shape, min(rank, *w.shape))
    left, s, right = truncated_svd(w, rank, seed)
    root = s.sqrt()
    u, v = left * root, right * root
    if u.shape[1] < rank:  # the matrix has fewer singular values than the rank: pad with zeros
        pad = rank - u.shape[1]
        u = torch.nn.functional.pad(u, (0, pad))
        v = torch.nn.functional.pad(v, (0, pad))
    if itq:
        u, v = joint_itq(u, v, itq_iters)
    h, l_u = rank1_magnitudes(u, exact)
    g, l_v = rank1_magnitudes(v, exact)
    return u, v, h, l_u * l_v, g


def initialise(
    weight: torch.Tensor,
    rank: int,
    residual: bool = True,
    method: str = "dual-svid",
    seed: int = 0,
    input_scale: torch.Tensor | None = None,
    itq_iters: int = 50,
    output_scale: torch.Tensor | None = None,
) -> Factors:
    """Factors for ``weight`` (d_out x d_in), computed in fp32 on ``weight``'s device.

    ``input_scale`` (d_in, positive), e.g. the RMS of each input feature on calibration data, makes
    the fit minimise the error on the outputs rather than on the weights: the factorisation runs on
    ``weight * input_scale`` and the column scale ``g`` is divided by it afterwards, which leaves
    the signs' meaning unchanged. ``output_scale`` (d_out, positive) weights the rows the same way,
    e.g. by how much each output feature moves the model's loss, and divides ``h`` afterwards.
    """
    if method not in ("dual-svid", "itq", "itq-refined"):
        raise ValueError(f"unknown initialisation {method!r}")
    w = weight.detach().to(torch.float32)
    if input_scale is not None:
        input_scale = input_scale.to(w).clamp_min(1e-8)
        w = w * input_scale
    if output_scale is not None:
        output_scale = output_scale.to(w).clamp_min(1e-8)
        w = w * output_scale[:, None]
    paths = []
    target = w
    for p in range(2 if residual else 1):
        u, v, h, l, g = _one_path(target, rank, seed + p, method != "dual-svid", itq_iters)
        if method == "itq-refined":
            u, v, h, l, g = refine(target, u, v, h, l, g)
        paths.append((u, v, h, l, g))
        if p == 0 and residual:
            target = w - reconstruct(u[None], v[None], h[None], l[None], g[None])
    u, v, h, l, g = (torch.stack(t) for t in zip(*paths, strict=True))
    if input_scale is not None:
        g = g / input_scale
    if output_scale is not None:
        h = h / output_scale
    return Factors(u, v, h, l, g)
