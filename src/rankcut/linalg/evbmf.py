"""Empirical variational Bayesian matrix factorization (Nakajima et al., JMLR 2013): rank from the spectrum.

Global analytic solution with the noise variance estimated by a bounded 1-D minimization. It works from
singular values, so a layer's cached SVD is enough; no new decomposition is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TAU_BAR_SCALE = 2.5129  # τ̄ = 2.5129·√α: the threshold of the EVB solution in units of the noise level


@dataclass(frozen=True)
class EVBMFResult:
    """EVBMF's estimate for one matrix: rank, noise variance σ², the singular-value threshold, shrunk values."""

    rank: int
    sigma2: float
    threshold: float
    shrunk: torch.Tensor  # estimated singular values of the signal (the first ``rank`` are nonzero)
    shape: tuple[int, int]  # (L, M) after the transpose that makes L ≤ M


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ(x) = ½[x − (1+α) + √((x − (1+α))² − 4α)] for x above the threshold."""
    shifted = x - (1 + alpha)
    return 0.5 * (shifted + torch.sqrt(torch.clamp(shifted**2 - 4 * alpha, min=0.0)))


def _objective(sigma2: float, values_sq: torch.Tensor, L: int, M: int, x_bar: float) -> float:
    """Ω(σ²): the EVB free energy as a function of the noise variance (full spectrum, so no residual term)."""
    alpha = L / M
    x = values_sq / (M * sigma2)
    below, above = x[x <= x_bar], x[x > x_bar]
    tau = _tau(above, alpha)
    total = (below - torch.log(below)).sum()
    total += (above - tau + torch.log((tau + 1) / above) + alpha * torch.log(tau / alpha + 1)).sum()
    return float(total)


def _minimize_log(f, lower: float, upper: float, grid: int = 60, iterations: int = 60) -> float:
    """Minimize ``f`` on [lower, upper]: a log-spaced grid, then golden-section search around the best point."""
    if upper <= lower:
        return lower
    logs = torch.linspace(math.log(lower), math.log(upper), grid, dtype=torch.float64)
    values = [f(math.exp(v)) for v in logs.tolist()]
    best = min(range(grid), key=values.__getitem__)
    a, b = float(logs[max(best - 1, 0)]), float(logs[min(best + 1, grid - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(math.exp(d))
    candidates = [(values[best], float(logs[best])), (fc, c), (fd, d)]
    return math.exp(min(candidates)[1])


def evbmf(singular_values: torch.Tensor, shape: tuple[int, int], sigma2: float | None = None) -> EVBMFResult:
    """EVBMF on a matrix of ``shape`` given all of its singular values (descending).

    The matrix is treated as L×M with L ≤ M (transposed if needed, which does not change its singular
    values). ``sigma2`` fixes the noise variance; by default it is estimated.
    """
    L, M = sorted(shape)
    values = singular_values.detach().to(torch.float64).flatten()
    if values.numel() != L:
        raise ValueError(f"EVBMF needs all {L} singular values of a {shape[0]}x{shape[1]} matrix, got {values.numel()}")
    if not torch.isfinite(values).all():
        raise ValueError("EVBMF: singular values contain NaN or Inf")
    values_sq = values**2
    if float(values_sq.sum()) == 0.0:
        return EVBMFResult(0, 0.0, 0.0, torch.zeros_like(values), (L, M))
    alpha = L / M
    tau_bar = TAU_BAR_SCALE * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        h_bar = min(math.ceil(L / (1 + alpha)) - 1, L)  # at most this many components can be signal
        tail = values_sq[h_bar:]
        lower = max(float(values_sq[h_bar]) / (M * x_bar), float(tail.mean()) / M) if tail.numel() else 0.0
        upper = float(values_sq.sum()) / (L * M)
        lower = max(lower, upper * 1e-12)
        sigma2 = _minimize_log(lambda s2: _objective(s2, values_sq, L, M, x_bar), lower, upper)
    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int((values > threshold).sum())
    shrunk = torch.zeros_like(values)
    if rank:
        kept = values_sq[:rank]
        ratio = (L + M) * sigma2 / kept
        root = torch.sqrt(torch.clamp((1 - ratio) ** 2 - 4 * L * M * sigma2**2 / kept**2, min=0.0))
        shrunk[:rank] = values[:rank] / 2 * (1 - ratio + root)
    return EVBMFResult(rank, float(sigma2), threshold, shrunk, (L, M))
