"""Selectors that read each layer's spectrum: an energy threshold and EVBMF's automatic rank."""

from __future__ import annotations

import math

import torch

from rankcut.inventory import Candidate
from rankcut.linalg import Spectrum, evbmf
from rankcut.selectors.base import Choice, PerLayerSelector, RankPolicy


def energy_rank(spectrum: Spectrum, fraction: float) -> int:
    """The smallest rank whose singular values hold ``fraction`` of Σσ² (all groups together).

    A partial spectrum that never reaches ``fraction`` answers one more than the components it holds.
    """
    energy = spectrum.energy()
    found = int(torch.searchsorted(energy, torch.tensor(fraction - 1e-12, dtype=energy.dtype,
                                                        device=energy.device))) + 1
    return min(found, spectrum.max_rank + (0 if spectrum.complete else 1))


class Energy(PerLayerSelector):
    """Keep the smallest rank holding a fraction of each layer's energy Σσ² (per spectrum for Tucker-2)."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"energy: the fraction of Σσ² kept must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.spec = f"energy:{fraction:g}"

    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        decomposition = candidate.decomposition
        spectra = decomposition.spectra(candidate.basis())
        parts = [energy_rank(spectrum, self.fraction) for spectrum in spectra]
        rank = decomposition.rank_from_parts(parts)
        held = ", ".join(f"{float(spectrum.energy()[min(r, spectrum.max_rank) - 1]):.4f}"
                         for spectrum, r in zip(spectra, parts, strict=True))
        return policy.finalize(candidate, rank, f"{self.spec}: smallest rank holding {self.fraction:g} of Σσ² "
                                                f"(holds {held})")


class EVBMF(PerLayerSelector):
    """Rank from empirical variational Bayesian matrix factorization of each spectrum (per group: the max).

    ``weakening`` w moves the rank back toward full rank, r = max(full − w·(full − r_evbmf), min_rank): w = 1 is
    plain EVBMF; smaller w keeps more. ``min_rank`` is the floor used when EVBMF finds (almost) nothing above
    the noise, which happens on well-trained layers.
    """

    def __init__(self, weakening: float = 1.0, min_rank: int = 1) -> None:
        if not 0 <= weakening <= 1:
            raise ValueError(f"evbmf: the weakening factor must be in [0, 1], got {weakening}")
        if min_rank < 1:
            raise ValueError(f"evbmf: min_rank must be at least 1, got {min_rank}")
        self.weakening = weakening
        self.min_rank = min_rank
        self.spec = "evbmf" if weakening == 1 else f"evbmf:{weakening:g}"

    def _part(self, spectrum: Spectrum) -> tuple[int, str]:
        results = [evbmf(values, spectrum.matrix_shape) for values in spectrum.S]
        found = max(result.rank for result in results)
        worst = max(results, key=lambda result: result.rank)
        groups = f" (max over {len(results)} groups)" if len(results) > 1 else ""
        text = (f"σ²={worst.sigma2:.3g}, threshold={worst.threshold:.3g}, {found} of {spectrum.max_rank} values "
                f"above it{groups}")
        full = spectrum.max_rank
        rank = max(full - math.floor(self.weakening * (full - found)), self.min_rank)
        if self.weakening < 1:
            text += f"; weakened {self.weakening:g} → {rank}"
        elif found < self.min_rank:
            text += f"; floor {self.min_rank}"
        return min(rank, full), text

    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        decomposition = candidate.decomposition
        spectra = decomposition.spectra(candidate.basis())
        if not all(spectrum.complete for spectrum in spectra):
            raise ValueError(f"{self.spec} needs every singular value, but layer {candidate.name!r} has a partial "
                             "randomized SVD: raise randomized_above (--randomized-above) or use budget/energy")
        parts, texts = zip(*(self._part(s) for s in spectra), strict=True)
        labels = ("out", "in") if len(texts) == 2 else ("",)
        reason = "; ".join(f"{label + ': ' if label else ''}{text}" for label, text in zip(labels, texts, strict=True))
        return policy.finalize(candidate, decomposition.rank_from_parts(list(parts)), f"{self.spec}: {reason}")
