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
"""

from __future__ import annotations

import torch

# Sweeps of single-bit flips per side and round, as a multiple of the rank (rows rarely need more).
SWEEPS_PER_RANK = 1
# A flip must raise a row's fit by this fraction at least, so rounding cannot make bits flip back.
MIN_GAIN = 1e-6


def _signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def fit_rows(
    w: torch.Tensor, s: torch.Tensor, l: torch.Tensor, s_other: torch.Tensor, scale_other: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs ``s`` (rows of w x r) and row scales for ``w ~ diag(scale) s diag(l) s_other^T
    diag(scale_other)``, starting from ``s``; the scales come out non-negative."""
    b = (l[:, None] * s_other.T) * scale_other[None, :]  # r x n
    gram = b @ b.T
    corr = w @ b.T  # c_i as rows
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


def fit_latent_scale(
    w: torch.Tensor, s_u: torch.Tensor, h: torch.Tensor, s_v: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """The least-squares ``l`` for fixed signs and row/column scales."""
    a, b = h[:, None] * s_u, g[:, None] * s_v
    m = (a.T @ a) * (b.T @ b)
    rhs = ((a.T @ w) * b.T).sum(1)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One path's latents and scales (as ``init._one_path`` returns them) refitted to ``w``.

    The latents keep their magnitudes and take the refitted signs, so training starts from the
    refitted binary factors with the same latent spread as before.
    """
    s_u, s_v = _signs(u), _signs(v)
    for _ in range(rounds):
        s_u, h = fit_rows(w, s_u, l, s_v, g)
        s_v, g = fit_rows(w.T, s_v, l, s_u, h)
        l = fit_latent_scale(w, s_u, h, s_v, g)
        s_u = s_u * _signs(l)[None, :]
        l = l.abs()
    # a zero latent reads as +1: give every latent a magnitude so that it can carry a -1
    floor_u = 1e-6 * u.abs().max().clamp_min(1e-30)
    floor_v = 1e-6 * v.abs().max().clamp_min(1e-30)
    return s_u * u.abs().clamp_min(floor_u), s_v * v.abs().clamp_min(floor_v), h, l, g
