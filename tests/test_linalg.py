"""Known answers for the tensor math: SVD slices and Tucker-2 by HOOI."""

import pytest
import torch

from rankcut.linalg import Spectrum, TuckerBasis


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (3, 6, 4)])
def test_full_rank_factors_reconstruct_the_matrix(shape):
    matrix = _random(*shape)
    spectrum = Spectrum.of(matrix)
    A, B = spectrum.factors(spectrum.max_rank)
    torch.testing.assert_close((A @ B).reshape(matrix.shape), matrix, rtol=0, atol=1e-12)
    assert spectrum.relative_error(spectrum.max_rank) == pytest.approx(0.0, abs=1e-12)


def test_truncation_error_is_the_tail_of_the_spectrum():
    matrix = _random(12, 9)
    spectrum = Spectrum.of(matrix)
    for rank in (1, 4, 8):
        A, B = spectrum.factors(rank)
        measured = torch.linalg.norm(matrix - (A @ B)[0]) / torch.linalg.norm(matrix)
        assert spectrum.relative_error(rank) == pytest.approx(float(measured), rel=1e-10)


def test_energy_is_cumulative_and_ends_at_one():
    spectrum = Spectrum.of(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(spectrum.energy(), torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))


def test_factors_refuse_out_of_range_ranks_and_nan():
    spectrum = Spectrum.of(_random(4, 3))
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        spectrum.factors(0)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        spectrum.factors(4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Spectrum.of(torch.tensor([[1.0, float("nan")]]))


def _reconstruct(factors) -> torch.Tensor:
    core = factors.core.reshape(*factors.core.shape[:3], -1)
    full = torch.einsum("gtr,grsk,gqs->gtqk", factors.U_out, core, factors.U_in)
    return full.reshape(*full.shape[:3], *factors.core.shape[3:])


def test_tucker2_full_rank_is_exact_and_reports_its_error():
    kernel = _random(2, 6, 4, 3, 3)
    basis = TuckerBasis.of(kernel)
    exact = basis.factorize(basis.max_ranks)
    torch.testing.assert_close(_reconstruct(exact), kernel, rtol=0, atol=1e-12)
    truncated = basis.factorize((3, 2))
    measured = torch.linalg.norm(_reconstruct(truncated) - kernel) / torch.linalg.norm(kernel)
    assert truncated.relative_error == pytest.approx(float(measured), rel=1e-8)


def test_hooi_is_no_worse_than_hosvd():
    kernel = _random(1, 16, 12, 3, 3, seed=3)
    basis = TuckerBasis.of(kernel)
    hooi = basis.factorize((5, 4)).relative_error
    hosvd = basis.factorize((5, 4), iterations=0).relative_error
    assert hooi <= hosvd + 1e-12


def test_tucker2_recovers_a_planted_multilinear_rank():
    g = torch.Generator().manual_seed(7)
    core = torch.randn(1, 3, 2, 3, 3, generator=g, dtype=torch.float64)
    U_out = torch.linalg.qr(torch.randn(1, 10, 3, generator=g, dtype=torch.float64))[0]
    U_in = torch.linalg.qr(torch.randn(1, 8, 2, generator=g, dtype=torch.float64))[0]
    kernel = torch.einsum("gtr,grskl,gqs->gtqkl", U_out, core, U_in)
    assert TuckerBasis.of(kernel).factorize((3, 2)).relative_error < 1e-10


def test_tucker2_projection_on_chosen_components():
    """``truncate`` keeps exactly the chosen singular vectors of each unfolding (no HOOI): the leading ones give
    the HOSVD, all of them the kernel; its error and ``captured_energy`` agree, and ``kernel()`` rebuilds it."""
    kernel = _random(2, 6, 4, 3, 3, seed=5)
    basis = TuckerBasis.of(kernel)
    full = basis.truncate(range(basis.max_ranks[0]), range(basis.max_ranks[1]))
    torch.testing.assert_close(full.kernel(), kernel, rtol=0, atol=1e-12)
    leading = basis.truncate(range(3), range(2))
    hosvd = basis.factorize((3, 2), iterations=0)
    torch.testing.assert_close(leading.kernel(), _reconstruct(hosvd), rtol=0, atol=1e-12)
    captured = basis.captured_energy([(3, 2), basis.max_ranks])
    assert leading.relative_error**2 == pytest.approx(1 - float(captured[0]), rel=1e-9)
    assert float(captured[1]) == pytest.approx(1.0, rel=1e-12)
    subset = basis.truncate([0, 2], [1])
    U_out, U_in = basis.out_spectrum.U[:, :, [0, 2]], basis.in_spectrum.U[:, :, [1]]
    project_out, project_in = U_out @ U_out.transpose(1, 2), U_in @ U_in.transpose(1, 2)
    expected = torch.einsum("gta,gabkm,gbs->gtskm", project_out, kernel, project_in)  # P_out K P_in
    torch.testing.assert_close(subset.kernel(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="distinct indices"):
        basis.truncate([0, 0], [1])
