"""Tucker-2 decomposition of grouped conv kernels (the two channel modes), by HOOI from an HOSVD start."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rankcut.linalg.spectrum import Spectrum


def unfold_out(kernel: torch.Tensor) -> torch.Tensor:
    """Mode-0 (output-channel) unfolding of (g, T, S, *k) kernels: (g, T, S·k)."""
    g, t = kernel.shape[:2]
    return kernel.reshape(g, t, -1)


def unfold_in(kernel: torch.Tensor) -> torch.Tensor:
    """Mode-1 (input-channel) unfolding of (g, T, S, *k) kernels: (g, S, T·k)."""
    g, _, s = kernel.shape[:3]
    return kernel.transpose(1, 2).reshape(g, s, -1)


@dataclass(frozen=True)
class Tucker2Factors:
    """``K[g] ≈ core[g] ×₀ U_out[g] ×₁ U_in[g]`` with orthonormal columns in ``U_out`` and ``U_in``."""

    U_out: torch.Tensor  # (g, T, R_out)
    core: torch.Tensor  # (g, R_out, R_in, *k)
    U_in: torch.Tensor  # (g, S, R_in)
    target: torch.Tensor = field(repr=False)  # the kernels approximated (g, T, S, *k)

    @functools.cached_property
    def relative_error(self) -> float:
        """‖K − K̂‖/‖K‖, measured on the rebuilt kernel when first asked for: ‖K‖² − ‖core‖² keeps only half
        the digits (an exact fit read as 3e-8 on one CPU and 0 on another)."""
        norm = torch.linalg.norm(self.target)
        return float(torch.linalg.norm(self.target - self.kernel()) / norm) if norm > 0 else 0.0

    def kernel(self) -> torch.Tensor:
        """The approximated kernels ``core ×₀ U_out ×₁ U_in``: (g, T, S, *k)."""
        g, r_out, r_in = self.core.shape[:3]
        flat = torch.einsum("gtr,grsk->gtsk", self.U_out, self.core.reshape(g, r_out, r_in, -1))
        flat = torch.einsum("gtrk,gsr->gtsk", flat, self.U_in)
        return flat.reshape(g, flat.shape[1], flat.shape[2], *self.core.shape[3:])


def _project(kernel: torch.Tensor, U_out: torch.Tensor | None, U_in: torch.Tensor | None) -> torch.Tensor:
    """Multiply the channel modes of ``kernel`` by ``U_outᵀ`` and/or ``U_inᵀ``."""
    g, t, s = kernel.shape[:3]
    flat = kernel.reshape(g, t, s, -1)
    if U_out is not None:
        flat = torch.einsum("gtsk,gtr->grsk", flat, U_out)
    if U_in is not None:
        flat = torch.einsum("gtsk,gsr->gtrk", flat, U_in)
    return flat.reshape(g, flat.shape[1], flat.shape[2], *kernel.shape[3:])


@dataclass(frozen=True)
class TuckerBasis:
    """The two channel unfoldings' spectra of a kernel, computed once and reused for every rank pair."""

    kernel: torch.Tensor  # (g, T, S, *k) float64
    out_spectrum: Spectrum
    in_spectrum: Spectrum

    @classmethod
    def of(cls, kernel: torch.Tensor) -> TuckerBasis:
        """Spectra of the mode-0 and mode-1 unfoldings of a (g, T, S, *k) kernel, in float64."""
        kernel = kernel.to(torch.float64)
        return cls(kernel, Spectrum.of(unfold_out(kernel)), Spectrum.of(unfold_in(kernel)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this basis, by name (for a safetensors file or a broadcast)."""
        parts = {"kernel": self.kernel.contiguous()}
        for prefix, spectrum in (("out.", self.out_spectrum), ("in.", self.in_spectrum)):
            parts.update({prefix + name: tensor for name, tensor in spectrum.tensors().items()})
        return parts

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor],
                     loader: Callable[[str], torch.Tensor] | None = None) -> TuckerBasis:
        """The basis ``tensors()`` described; with ``loader``, the unfoldings' vectors are read on access."""
        def spectrum(prefix: str) -> Spectrum:
            own = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
            return Spectrum.from_tensors(own, None if loader is None else lambda name: loader(prefix + name))

        return cls(tensors["kernel"], spectrum("out."), spectrum("in."))

    @property
    def max_ranks(self) -> tuple[int, int]:
        """Largest useful (R_out, R_in): the ranks of the two unfoldings' bases."""
        return self.out_spectrum.max_rank, self.in_spectrum.max_rank

    def rotated(self) -> torch.Tensor:
        """The kernel in the unfoldings' full bases, ``K ×₀ U_outᵀ ×₁ U_inᵀ``: (g, R_out, R_in, *k).

        Block (j, l) is what the j-th output and l-th input components carry together; keeping the leading
        blocks is the HOSVD truncation, and ``captured_energy`` sums their squares.
        """
        return _project(self.kernel, self.out_spectrum.U, self.in_spectrum.U)

    def captured_energy(self, ranks: Sequence[tuple[int, int]]) -> torch.Tensor:
        """‖K_r‖²/‖K‖² of the HOSVD truncation at each (R_out, R_in) in ``ranks``."""
        blocks = self.rotated().pow(2).flatten(3).sum((0, 3))  # (R_out, R_in)
        prefix = blocks.cumsum(0).cumsum(1)
        total = self.kernel.pow(2).sum()
        captured = torch.stack([prefix[r_out - 1, r_in - 1] for r_out, r_in in ranks])
        return captured / total if total > 0 else torch.ones_like(captured)  # a zero kernel loses nothing

    def truncate(self, out_components: Sequence[int], in_components: Sequence[int]) -> Tucker2Factors:
        """Projection on chosen singular vectors of each unfolding (leading ones: the HOSVD truncation), no HOOI.

        These are the weights whose loss change the loss-aware selectors predict and measure.
        """
        out_index = self.out_spectrum.component_index(len(out_components), out_components)
        in_index = self.in_spectrum.component_index(len(in_components), in_components)
        U_out, U_in = self.out_spectrum.U[:, :, out_index], self.in_spectrum.U[:, :, in_index]
        return self._factors(U_out, U_in)

    def _factors(self, U_out: torch.Tensor, U_in: torch.Tensor) -> Tucker2Factors:
        return Tucker2Factors(U_out, _project(self.kernel, U_out, U_in), U_in, self.kernel)

    def factorize(self, ranks: tuple[int, int], iterations: int = 10, tol: float = 1e-10) -> Tucker2Factors:
        """Rank-(R_out, R_in) Tucker-2 by higher-order orthogonal iteration, started from the HOSVD."""
        r_out, r_in = ranks
        max_out, max_in = self.max_ranks
        if not (1 <= r_out <= max_out and 1 <= r_in <= max_in):
            raise ValueError(f"Tucker-2 ranks must be in [1, {max_out}] x [1, {max_in}], got {ranks}")
        U_out = self.out_spectrum.U[:, :, :r_out]
        U_in = self.in_spectrum.U[:, :, :r_in]
        norm_sq = self.kernel.pow(2).sum()
        previous = -1.0
        kernel_size = self.kernel[0, 0, 0].numel()
        # HOOI can only move the bases when each rank fits in the other mode's projected width.
        iterate = (r_out, r_in) != (max_out, max_in) and r_out <= r_in * kernel_size and r_in <= r_out * kernel_size
        for _ in range(iterations if iterate else 0):
            U_out = torch.linalg.svd(unfold_out(_project(self.kernel, None, U_in)), full_matrices=False)[0]
            U_out = U_out[:, :, :r_out]
            U_in = torch.linalg.svd(unfold_in(_project(self.kernel, U_out, None)), full_matrices=False)[0]
            U_in = U_in[:, :, :r_in]
            captured = float(_project(self.kernel, U_out, U_in).pow(2).sum())
            if abs(captured - previous) <= tol * float(norm_sq):
                break
            previous = captured
        return self._factors(U_out, U_in)
