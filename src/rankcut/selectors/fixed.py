"""Selectors that need no spectrum: full rank, a fixed fraction of each layer's params, a fixed rank."""

from __future__ import annotations

from rankcut.inventory import Candidate
from rankcut.layers import Rank
from rankcut.selectors.base import Choice, PerLayerSelector, RankPolicy


class FullRank(PerLayerSelector):
    """Full-rank factors: the same outputs as the dense model (a check of the machinery; no guard)."""

    spec = "full"
    uses_break_even = False

    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        return Choice(candidate.decomposition.max_rank(candidate.info), "full: full rank, exact")


class FixedFraction(PerLayerSelector):
    """Keep the same fraction of each layer's parameters: the largest rank whose params fit."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fixed: the fraction of params kept must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.spec = f"fixed:{fraction:g}"

    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        info, decomposition = candidate.info, candidate.decomposition
        budget = int(self.fraction * info.dense_params)
        rank = decomposition.rank_for_params(info, budget)
        if rank is None:
            return Choice(None, f"{self.spec}: no rank fits in {budget} params; kept dense")
        why = f"{self.spec}: largest rank with params <= {self.fraction:.0%} of {info.dense_params}"
        return policy.finalize(candidate, rank, why)


class FixedRank(PerLayerSelector):
    """The same rank for every layer, capped at each layer's full rank."""

    def __init__(self, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"rank: the rank must be a positive integer, got {rank}")
        self.rank = rank
        self.spec = f"rank:{rank}"

    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        full = candidate.decomposition.max_rank(candidate.info)
        limits = (full,) if isinstance(full, int) else full
        parts = tuple(min(self.rank, limit) for limit in limits)
        capped = " (capped at full rank)" if min(parts) < self.rank else ""
        rank: Rank = parts[0] if isinstance(full, int) else parts
        return policy.finalize(candidate, rank, f"{self.spec}: fixed rank{capped}")
