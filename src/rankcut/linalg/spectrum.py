"""Singular value decomposition of a batch of matrices, computed once in float64 and sliced per rank."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Spectrum:
    """SVD ``M[g] = U[g] diag(S[g]) Vh[g]`` of ``g`` stacked matrices (one per conv group).

    Computed once; ``factors(r)`` and ``relative_error(r)`` are slices, so trying many ranks costs nothing.
    """

    U: torch.Tensor  # (g, m, k)
    S: torch.Tensor  # (g, k), descending
    Vh: torch.Tensor  # (g, k, n)

    @classmethod
    def of(cls, matrices: torch.Tensor) -> Spectrum:
        """SVD of ``matrices`` of shape (g, m, n) or (m, n), in float64 on the tensors' device."""
        if matrices.dim() == 2:
            matrices = matrices.unsqueeze(0)
        if matrices.dim() != 3:
            raise ValueError(f"expected (m, n) or (g, m, n) matrices, got shape {tuple(matrices.shape)}")
        if not torch.isfinite(matrices).all():
            raise ValueError("matrix has NaN or Inf entries; it cannot be factorized")
        U, S, Vh = torch.linalg.svd(matrices.to(torch.float64), full_matrices=False)
        return cls(U, S, Vh)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) of each decomposed matrix."""
        return self.U.shape[1], self.Vh.shape[2]

    @property
    def max_rank(self) -> int:
        """Number of singular values per group: min(m, n)."""
        return self.S.shape[-1]

    def energy(self) -> torch.Tensor:
        """Cumulative fraction of Σσ² (summed over groups) kept by ranks 1..max_rank."""
        return self._energy

    @functools.cached_property
    def _energy(self) -> torch.Tensor:
        squares = (self.S**2).sum(0)
        total = squares.sum()
        if total == 0:
            return torch.ones_like(squares)
        return squares.cumsum(0) / total

    def relative_error(self, rank: int) -> float:
        """‖M − M_r‖_F / ‖M‖_F of the rank-``rank`` truncation (all groups together)."""
        squares = self.S**2
        total = squares.sum()
        if total == 0:
            return 0.0
        return float((squares[:, rank:].sum() / total).sqrt())

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
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
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
        total = squares.sum()
        if total == 0:
            return 0.0
        kept = squares[:, torch.tensor(sorted(components), dtype=torch.long)].sum()
        return float(((total - kept).clamp(min=0) / total).sqrt())
