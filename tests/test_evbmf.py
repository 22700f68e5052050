"""EVBMF against known answers: planted ranks, pure noise, invariances and the closed-form threshold."""

import math

import pytest
import torch

from rankcut.linalg import evbmf

from toy_models import planted


def run(matrix: torch.Tensor):
    return evbmf(torch.linalg.svdvals(matrix), tuple(matrix.shape))


@pytest.mark.parametrize(("m", "n"), [(60, 200), (200, 60), (120, 120), (32, 288)])
@pytest.mark.parametrize("noise", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("rank", [1, 7])
def test_recovers_the_planted_rank(m, n, rank, noise):
    result = run(planted(m, n, rank, noise, seed=m + n + rank))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(noise**2, rel=0.15)


@pytest.mark.parametrize(("m", "n"), [(50, 50), (40, 160), (160, 40)])
def test_pure_noise_has_rank_zero(m, n):
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert run(noise).rank == 0


def test_invariant_to_transpose_and_scale():
    matrix = planted(48, 150, 5, 0.3, seed=4)
    base = run(matrix)
    for other in (run(matrix.T), run(1000 * matrix), run(1e-3 * matrix.T)):
        assert other.rank == base.rank
    assert run(1000 * matrix).sigma2 == pytest.approx(1e6 * base.sigma2, rel=1e-6)
    assert run(1000 * matrix).threshold == pytest.approx(1000 * base.threshold, rel=1e-6)


def test_known_noise_gives_the_closed_form_threshold():
    L, M, sigma2 = 30, 90, 0.7
    values = torch.linspace(20, 0.1, L, dtype=torch.float64)
    result = evbmf(values, (M, L), sigma2=sigma2)  # given as M x L: the transpose is automatic
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    assert result.threshold == pytest.approx(threshold, rel=1e-12)
    assert result.rank == int((values > threshold).sum())
    assert result.shape == (L, M)


def test_shrunk_values_are_smaller_and_positive_for_kept_components():
    result = run(planted(80, 100, 4, 0.5, seed=2))
    values = torch.linalg.svdvals(planted(80, 100, 4, 0.5, seed=2))
    assert torch.all(result.shrunk[:4] > 0) and torch.all(result.shrunk[:4] < values[:4])
    assert torch.all(result.shrunk[4:] == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="all 3 singular values"):
        evbmf(torch.ones(2), (3, 5))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(torch.tensor([1.0, float("nan")]), (2, 2))
    assert evbmf(torch.zeros(3), (3, 4)).rank == 0
