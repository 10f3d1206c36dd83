"""Refining binary factors: their signs and scales fitted to the weight itself.

Joint-ITQ (``init.joint_itq``) picks signs that fit the continuous factors of a truncated SVD, then
fits the scales to those factors' magnitudes; neither step looks at the weight that the binary
product has to reproduce. ``refine`` fits one path, W ~ diag(h) S_U diag(l) S_V^T diag(g), to the
weight by block coordinate descent, in which no step raises the Frobenius error:

- S_U and h, the rest fixed: the rows are independent. Row i is h_i s^T B with B = diag(l) S_V^T
  diag(g); for fixed signs s the best h_i is (s.c_i) / (s^T G s) (c_i = B w_i, G = B B^T), which
  leaves the error |w_i|^2 - (s.c_i)^2 / (s^T G s). Each sweep flips, in every row at once, the one
  bit that raises that ratio most, an O(r) test per bit from running values of s.c_i and G s.
- S_V and g: the same on the transpose.
- l: least squares, (A^T A * B^T B) l = diag(A^T W B) with A = diag(h) S_U and B = diag(g) S_V.

With ``covariance`` C (the second moment of the layer's inputs on calibration text) the fit is to the
layer's outputs instead: the error is tr(E C E^T), E = W - W_hat, what the next layer actually sees.
The rows stay independent (G = B C B^T, c_i = B C w_i), and so does l's least squares, but C couples
the columns: ``fit_columns`` updates them a block at a time, every column of a block solved as a row
is (given the others), and keeps a block's change only where the exact joint change lowers the error.
"""

from __future__ import annotations

import torch

# Sweeps of single-bit flips per side and round, as a multiple of the rank (rows rarely need more).
SWEEPS_PER_RANK = 1
# A flip must raise a row's fit by this fraction at least, so rounding cannot make bits flip back.
MIN_GAIN = 1e-6
# Columns solved together, and passes over them per round, when a covariance couples them: on the
# default model's layers 64 x 2 came within 0.5 % of the output error of exact one-column-at-a-time
# updates in a third of the time (256 fell 1-4 % behind).
COLUMN_BLOCK = 64
COLUMN_SWEEPS = 2
# Added to the covariance, normalised to mean diagonal 1.
COVARIANCE_RIDGE = 1e-4


def _signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def best_flips(corr: torch.Tensor, gram: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs ``s`` (k x r) and scales for k independent problems ``max (s.c)^2 / (s^T G s)``: the
    fit of a target by ``scale * s^T B`` with ``c = B target`` (rows of ``corr``), ``G = B B^T``.
    Greedy single-bit flips from ``s``; the scales come out non-negative."""
    s = s.clone()
    gs = s @ gram  # G s_i as rows
    dot = (s * corr).sum(1)
    quad = (s * gs).sum(1)
    diag = torch.diagonal(gram)
    rows = torch.arange(s.shape[0], device=s.device)
    for _ in range(SWEEPS_PER_RANK * s.shape[1]):
        dot_f = dot[:, None] - 2 * s * corr
        quad_f = quad[:, None] - 4 * s * gs + 4 * diag[None, :]
        fit = dot.square() / quad.clamp_min(1e-30)
        best, k = (dot_f.square() / quad_f.clamp_min(1e-30)).max(1)
        flip = best > fit * (1 + MIN_GAIN)
        if not bool(flip.any()):
            break
        i, k = rows[flip], k[flip]
        was = s[i, k]
        s[i, k] = -was
        dot[i], quad[i] = dot_f[i, k], quad_f[i, k]
        gs[i] -= 2 * was[:, None] * gram[k]
    scale = dot / quad.clamp_min(1e-30)
    s = s * _signs(scale)[:, None]  # a negative scale is the same row with its signs flipped
    return s, scale.abs()


def fit_rows(
    w: torch.Tensor,
    s: torch.Tensor,
    l: torch.Tensor,
    s_other: torch.Tensor,
    scale_other: torch.Tensor,
    covariance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs ``s`` (rows of w x r) and row scales for ``w ~ diag(scale) s diag(l) s_other^T
    diag(scale_other)``, starting from ``s``; the error is weighted by ``covariance`` over the
    columns when given. The scales come out non-negative."""
    b = (l[:, None] * s_other.T) * scale_other[None, :]  # r x n
    bc = b if covariance is None else b @ covariance
    return best_flips(w @ bc.T, bc @ b.T, s)


def fit_columns(
    w: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    covariance: torch.Tensor,
    block: int = COLUMN_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs ``s`` (n x r) and column scales ``g`` for ``w ~ a s^T diag(g)`` (a = diag(h) S_U diag(l))
    under the error tr(E C E^T), C = ``covariance``; no block's update raises it.

    With P = s^T diag(g) and M = a^T a, flipping P's column j to p + d changes the error by
    -2 d.q_j + C_jj d^T M d, q = a^T E C: column j alone is a row problem with gram M and target
    (q_j + C_jj M p_j) / C_jj. The columns of a block are solved together from the same q, which
    ignores how they move each other through C; the exact joint change decides: the block's longest
    leading half, quarter, ... that lowers the error is kept, the rest is solved again from the
    updated q, and the block size follows what passed (strongly coupled inputs get short blocks).
    """
    m = a.T @ a
    s, g = s.clone(), g.clone()
    n = s.shape[0]
    diag = torch.diagonal(covariance).clamp_min(1e-30)
    q = a.T @ (w - a @ (s * g[:, None]).T) @ covariance  # r x n
    lo, size = 0, block
    while lo < n:
        hi = min(lo + size, n)
        p = (s[lo:hi] * g[lo:hi, None]).T
        target = (q[:, lo:hi] + (m @ p) * diag[None, lo:hi]) / diag[None, lo:hi]
        s_new, g_new = best_flips(target.T, m, s[lo:hi])
        d = (s_new * g_new[:, None]).T - p
        # the longest leading run of the block whose joint change lowers the error (halving)
        while True:
            md_c = (m @ d) @ covariance[lo:hi]
            change = -2 * (q[:, lo:hi] * d).sum() + (md_c[:, lo:hi] * d).sum()
            if change <= 0 or hi - lo == 1:
                break
            hi = lo + (hi - lo) // 2
            d = d[:, : hi - lo]
        if change <= 0:
            s[lo:hi], g[lo:hi] = s_new[: hi - lo], g_new[: hi - lo]
            q -= md_c
        # the next block as long as the run that passed, twice as long once a whole block passes
        size = min(block, 2 * size) if hi - lo == size else max(1, hi - lo)
        lo = hi
    return s, g


def fit_latent_scale(
    w: torch.Tensor,
    s_u: torch.Tensor,
    h: torch.Tensor,
    s_v: torch.Tensor,
    g: torch.Tensor,
    covariance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The least-squares ``l`` for fixed signs and row/column scales (error weighted by ``covariance``
    over the columns when given)."""
    a, b = h[:, None] * s_u, g[:, None] * s_v
    bc = b if covariance is None else covariance @ b
    m = (a.T @ a) * (b.T @ bc)
    rhs = ((a.T @ w) * bc.T).sum(1)
    ridge = 1e-6 * torch.diagonal(m).mean().clamp_min(1e-30)  # padding latents have all-zero rows
    return torch.linalg.solve(m + ridge * torch.eye(m.shape[0], dtype=m.dtype, device=m.device), rhs)


def refine(
    w: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    rounds: int = 3,
    covariance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One path's latents and scales (as ``init._one_path`` returns them) refitted to ``w``: to its
    Frobenius error, or with ``covariance`` (d_in x d_in, the inputs' second moment) to the error of
    its outputs on those inputs.

    The latents keep their magnitudes and take the refitted signs, so training starts from the
    refitted binary factors with the same latent spread as before.
    """
    s_u, s_v = _signs(u), _signs(v)
    if covariance is not None:
        covariance = covariance.to(w) / torch.diagonal(covariance).mean().clamp_min(1e-30)
        # a feature no calibration token drives still gets a (small) weight: its scale stays defined
        covariance = covariance + COVARIANCE_RIDGE * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(rounds):
        s_u, h = fit_rows(w, s_u, l, s_v, g, covariance)
        if covariance is None:
            s_v, g = fit_rows(w.T, s_v, l, s_u, h)
        else:
            for _ in range(COLUMN_SWEEPS):
                s_v, g = fit_columns(w, (h[:, None] * s_u) * l[None, :], s_v, g, covariance)
        l = fit_latent_scale(w, s_u, h, s_v, g, covariance)
        s_u = s_u * _signs(l)[None, :]
        l = l.abs()
    # a zero latent reads as +1: give every latent a magnitude so that it can carry a -1
    floor_u = 1e-6 * u.abs().max().clamp_min(1e-30)
    floor_v = 1e-6 * v.abs().max().clamp_min(1e-30)
    return s_u * u.abs().clamp_min(floor_u), s_v * v.abs().clamp_min(floor_v), h, l, g
