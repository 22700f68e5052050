"""Singular value decomposition of a batch of matrices, computed once in float64 and sliced per rank."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

VectorLoader = Callable[[str], torch.Tensor]
# share of the Gram matrix's mean diagonal added before whitening (see ``Spectrum.whitened``)
WHITENING_RIDGE = 1e-4


class RandomizedSVDError(ValueError):
    """A randomized SVD whose singular triplets failed the residual check."""


class Spectrum:
    """SVD ``M[g] = U[g] diag(S[g]) Vh[g]`` of ``g`` stacked matrices (one per conv group), or of the matrices
    whitened by their inputs (``whitened``: then ``Vh`` holds right factors and energies are output energies).

    Computed once; ``factors(r)`` and ``relative_error(r)`` are slices, so trying many ranks costs nothing.
    A *partial* spectrum (from ``randomized``) holds only the leading components but knows each matrix's
    total energy, so energies and errors stay exact. The singular vectors may live on disk (``loader``):
    they are then read on each access and never kept, so many layers' spectra fit in little memory.
    """

    def __init__(self, U: torch.Tensor | None, S: torch.Tensor, Vh: torch.Tensor | None, *,
                 matrix_shape: tuple[int, int] | None = None, total_squares: torch.Tensor | None = None,
                 loader: VectorLoader | None = None) -> None:
        if (U is None or Vh is None) and loader is None:
            raise ValueError("a spectrum needs its singular vectors or a loader for them")
        self._U, self._Vh, self._loader = U, Vh, loader
        self.S = S  # (g, k), descending
        self._shape = matrix_shape or (U.shape[1], Vh.shape[2])
        self.total_squares = (S**2).sum(1) if total_squares is None else total_squares  # (g,) Σσ² of all
        self.residual = 0.0  # worst singular-pair residual / σ₁ of a randomized spectrum (0 for an exact one)
        # energy of the components a partial spectrum does not hold (exactly 0 for a complete one)
        self._untracked = (0.0 if total_squares is None
                           else float((total_squares.sum() - (S**2).sum()).clamp(min=0)))

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors (g, m, k)."""
        return self._U if self._U is not None else self._loader("U")

    @property
    def Vh(self) -> torch.Tensor:
        """Right singular vectors (g, k, n)."""
        return self._Vh if self._Vh is not None else self._loader("Vh")

    @classmethod
    def of(cls, matrices: torch.Tensor) -> Spectrum:
        """SVD of ``matrices`` of shape (g, m, n) or (m, n), in float64 on the tensors' device."""
        matrices = _checked(matrices)
        U, S, Vh = torch.linalg.svd(matrices.to(torch.float64), full_matrices=False)
        return cls(U, S, Vh)

    @classmethod
    def whitened(cls, matrices: torch.Tensor, gram: torch.Tensor, ridge: float = WHITENING_RIDGE) -> Spectrum:
        """SVD of ``M[g] L[g]`` with ``L Lᵀ = X Xᵀ``, the inputs' Gram matrix: truncation error in the outputs.

        Dropping σ_i changes ``M X`` by exactly σ_i in Frobenius norm (SVD-LLM's truncation-aware whitening),
        so ``energy`` and ``relative_error`` measure output error on those inputs, ‖(M − M_r)X‖/‖M X‖.
        ``Vh`` then holds the right factors ``V_iᵀ L⁻¹`` (not orthonormal) and ``U diag(S) Vh`` is still M.
        ``gram`` is (g, n, n) or (n, n); ``ridge`` × its mean diagonal is added so that inputs that never
        vary (dead channels, padding) keep it positive definite.
        """
        matrices = _checked(matrices).to(torch.float64)
        gram = _checked(gram).to(torch.float64)
        g, _, n = matrices.shape
        if gram.shape != (g, n, n):
            raise ValueError(f"the Gram matrix must be ({g}, {n}, {n}) for matrices of shape "
                             f"{tuple(matrices.shape)}, got {tuple(gram.shape)}")
        if ridge < 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}")
        scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=torch.finfo(torch.float64).tiny)
        identity = torch.eye(n, dtype=torch.float64, device=gram.device)
        lower, info = torch.linalg.cholesky_ex(gram + (ridge * scale)[:, None, None] * identity)
        if int(info.max()) > 0:
            raise ValueError("the Gram matrix is not positive definite even with the ridge; "
                             f"raise the ridge (now {ridge:g}) or use the plain SVD")
        U, S, Vh = torch.linalg.svd(matrices @ lower, full_matrices=False)
        # right factors Vh L⁻¹: solve R L = Vh, i.e. Lᵀ Rᵀ = Vhᵀ (upper triangular)
        right = torch.linalg.solve_triangular(lower.transpose(1, 2), Vh.transpose(1, 2), upper=True).transpose(1, 2)
        return cls(U, S, right)

    @classmethod
    def randomized(cls, matrices: torch.Tensor, rank: int, *, oversample: int = 10, power_iterations: int = 4,
                   tolerance: float = 1e-2, seed: int = 0) -> Spectrum:
        """The leading ``rank`` singular triplets by randomized SVD (Halko et al. 2011), checked.

        Every kept triplet must be a singular pair to within ``tolerance`` of σ₁: ``‖M v − σ u‖`` and
        ``‖Mᵀu − σ v‖`` at most ``tolerance·σ₁``; otherwise ``RandomizedSVDError`` is raised (callers fall
        back to the exact SVD). The worst residual is kept in ``residual``.
        """
        matrices = _checked(matrices).to(torch.float64)
        g, m, n = matrices.shape
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank must be in [1, {min(m, n)}], got {rank}")
        width = min(rank + oversample, min(m, n))
        generator = torch.Generator(device=matrices.device).manual_seed(seed)
        probe = torch.randn(g, n, width, dtype=torch.float64, device=matrices.device, generator=generator)
        basis = torch.linalg.qr(matrices @ probe).Q
        for _ in range(power_iterations):
            basis = torch.linalg.qr(matrices.transpose(1, 2) @ basis).Q
            basis = torch.linalg.qr(matrices @ basis).Q
        small_U, S, Vh = torch.linalg.svd(basis.transpose(1, 2) @ matrices, full_matrices=False)
        U, S, Vh = (basis @ small_U)[:, :, :rank], S[:, :rank], Vh[:, :rank, :]
        scale = S[:, :1].unsqueeze(2).clamp(min=torch.finfo(torch.float64).tiny)
        left = (matrices @ Vh.transpose(1, 2) - U * S.unsqueeze(1)).norm(dim=1, keepdim=True) / scale
        right = (matrices.transpose(1, 2) @ U - Vh.transpose(1, 2) * S.unsqueeze(1)).norm(dim=1, keepdim=True) / scale
        worst = float(torch.maximum(left, right).max())
        if worst > tolerance:
            raise RandomizedSVDError(f"randomized SVD residual {worst:.2e} exceeds {tolerance:.0e} of σ₁")
        spectrum = cls(U, S, Vh, total_squares=matrices.pow(2).sum((1, 2)))
        spectrum.residual = worst
        return spectrum

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this spectrum, by name (for a safetensors file or a broadcast)."""
        return {"U": self.U.contiguous(), "S": self.S.contiguous(), "Vh": self.Vh.contiguous(),
                "total_squares": self.total_squares.contiguous(), "shape": torch.tensor(self._shape),
                "residual": torch.tensor(self.residual, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], loader: VectorLoader | None = None) -> Spectrum:
        """The spectrum ``tensors()`` described; with ``loader``, U and Vh are read on access instead."""
        if loader is None:
            spectrum = cls(tensors["U"], tensors["S"], tensors["Vh"], total_squares=tensors["total_squares"])
        else:
            shape = (int(tensors["shape"][0]), int(tensors["shape"][1]))
            spectrum = cls(None, tensors["S"], None, matrix_shape=shape, total_squares=tensors["total_squares"],
                           loader=loader)
        spectrum.residual = float(tensors["residual"]) if "residual" in tensors else 0.0
        return spectrum

    @property
    def complete(self) -> bool:
        """False for a partial (randomized) spectrum that holds fewer than min(m, n) components."""
        return self.max_rank == min(self._shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) of each decomposed matrix."""
        return self._shape

    @property
    def max_rank(self) -> int:
        """Number of singular values per group held: min(m, n), or fewer for a partial spectrum."""
        return self.S.shape[-1]

    def energy(self) -> torch.Tensor:
        """Cumulative fraction of Σσ² (summed over groups) kept by ranks 1..max_rank."""
        return self._energy

    @functools.cached_property
    def _energy(self) -> torch.Tensor:
        squares = (self.S**2).sum(0)
        total = squares.sum() + self._untracked
        if total == 0:
            return torch.ones_like(squares)
        return squares.cumsum(0) / total

    def relative_error(self, rank: int) -> float:
        """‖M − M_r‖_F / ‖M‖_F of the rank-``rank`` truncation (all groups together)."""
        squares = self.S**2
        total = squares.sum() + self._untracked
        if total == 0:
            return 0.0
        return float(((squares[:, rank:].sum() + self._untracked) / total).sqrt())

    def factors(self, rank: int, components: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors ``A (g, m, r)`` and ``B (g, r, n)`` with ``A @ B`` the rank-``rank`` truncation.

        ``components`` (``rank`` distinct indices) keeps those singular triplets instead of the leading ones.
        """
        index = self.component_index(rank, components)
        root = self.S[:, index].sqrt()
        A = self.U[:, :, index] * root.unsqueeze(1)
        B = root.unsqueeze(2) * self.Vh[:, index, :]
        return A, B

    def component_index(self, rank: int, components: Sequence[int] | None = None) -> torch.Tensor:
        """Indices of the kept triplets: the leading ``rank``, or ``components`` after checking them."""
        if not 1 <= rank <= self.max_rank:
            partial = "" if self.complete else " (a partial, randomized SVD holds only the leading components)"
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}{partial}")
        if components is None:
            return torch.arange(rank)
        kept = sorted(set(components))
        if len(kept) != len(components) or len(kept) != rank or kept[0] < 0 or kept[-1] >= self.max_rank:
            raise ValueError(f"components must be {rank} distinct indices in [0, {self.max_rank}), got {components}")
        return torch.tensor(kept)

    def reconstruct(self, components: Sequence[int]) -> torch.Tensor:
        """``Σ_i σ_i u_i v_iᵀ`` over ``components`` (may be empty), per group: shape (g, m, n)."""
        index = torch.tensor(sorted(components), dtype=torch.long)
        return (self.U[:, :, index] * self.S[:, index].unsqueeze(1)) @ self.Vh[:, index, :]

    def kept_error(self, components: Sequence[int]) -> float:
        """‖M − M_K‖_F / ‖M‖_F when only ``components`` are kept."""
        squares = self.S**2
        total = squares.sum() + self._untracked
        if total == 0:
            return 0.0
        kept = squares[:, torch.tensor(sorted(components), dtype=torch.long)].sum()
        return float(((total - kept).clamp(min=0) / total).sqrt())


def _checked(matrices: torch.Tensor) -> torch.Tensor:
    """``matrices`` as (g, m, n), refusing other shapes and non-finite entries."""
    if matrices.dim() == 2:
        matrices = matrices.unsqueeze(0)
    if matrices.dim() != 3:
        raise ValueError(f"expected (m, n) or (g, m, n) matrices, got shape {tuple(matrices.shape)}")
    if not torch.isfinite(matrices).all():
        raise ValueError("matrix has NaN or Inf entries; it cannot be factorized")
    return matrices
