"""What every selector shares: the choice it makes per layer, and the policy (rounding, break-even) ranks pass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rankcut.inventory import Candidate
from rankcut.latency import LatencyGuard
from rankcut.layers import Rank


@dataclass(frozen=True)
class Choice:
    """A selector's decision for one layer: a rank (None: keep it dense) and how it was reached.

    ``components``: the kept singular triplets when they are not the leading ``rank`` ones.
    """

    rank: Rank | None
    reason: str
    components: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RankPolicy:
    """Rules every selector's ranks pass through: hardware rounding and the break-even guard.

    The guard keeps a layer dense at ranks that do not reduce its params and MACs and, with a ``latency``
    guard, at ranks whose factors measured no faster than the dense layer.
    """

    round_to: int = 1
    break_even: bool = True
    latency: LatencyGuard | None = None
    # per layer name: the latency guard's search over the paying ranks, done once per plan
    _searches: dict[str, tuple[float, dict[Rank, float], Rank | None] | None] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {self.round_to!r}")

    def rounded(self, candidate: Candidate, rank: Rank) -> Rank:
        """``rank`` rounded to the nearest multiple of ``round_to`` (at least one), within the layer's maximum."""
        full = candidate.decomposition.max_rank(candidate.info)
        if self.round_to == 1:
            return rank

        def one(value: int, limit: int) -> int:
            multiple = max(self.round_to, int(value / self.round_to + 0.5) * self.round_to)
            return min(multiple, limit)

        if isinstance(full, int):
            return one(rank, full)
        return tuple(one(value, limit) for value, limit in zip(rank, full, strict=True))

    def candidate_ranks(self, candidate: Candidate) -> list[Rank]:
        """The layer's ranks after rounding, without repeats, smallest first."""
        decomposition, limit = candidate.decomposition, candidate.rank_limit
        ranks = dict.fromkeys(self.rounded(candidate, r) for r in decomposition.ranks_by_size(candidate.info))
        return [r for r in ranks if limit is None or r <= limit]

    def pays_off(self, candidate: Candidate, rank: Rank) -> bool:
        """True when ``rank`` passes the guard (always, when the guard is off)."""
        return self._refusal(candidate, rank) is None

    def _refusal(self, candidate: Candidate, rank: Rank) -> str | None:
        """Why the guard keeps the layer dense at ``rank``, or None."""
        decomposition, info = candidate.decomposition, candidate.info
        limit = candidate.rank_limit
        if limit is not None and rank > limit:
            return (f"rank {rank} is above the {limit} leading components its randomized SVD computed (ranks keeping "
                    f"more than {candidate.store.randomized_share:.0%} of its params are not offered): kept dense")
        if not self.break_even:
            return None
        if not decomposition.pays_off(info, rank):
            params = decomposition.params(info, rank) / info.dense_params
            macs = f", {decomposition.macs(info, rank) / info.dense_macs:.0%} of MACs" if info.dense_macs else ""
            return f"rank {rank} would keep {params:.0%} of params{macs}: not worth it, kept dense"
        search = self._latency_search(candidate)
        if search is None:
            return None
        dense_seconds, measured, fastest = search
        if fastest is not None and decomposition.params(info, rank) <= decomposition.params(info, fastest):
            return None
        shape = "x".join(map(str, info.input_shape))
        if fastest is None:
            slowest = min(measured.values())
            return (f"no rank is faster than the dense layer on input {shape} ({dense_seconds * 1e3:.3f} ms; "
                    f"factors took at least {slowest * 1e3:.3f} ms): kept dense")
        return (f"rank {rank} is above {fastest}, the largest rank measured faster than the dense layer on input "
                f"{shape} ({measured[fastest] * 1e3:.3f} vs {dense_seconds * 1e3:.3f} ms): kept dense")

    def _latency_search(self, candidate: Candidate) -> tuple[float, dict[Rank, float], Rank | None] | None:
        """The latency guard's timings for a layer (None without a guard or without a paying rank), cached."""
        if self.latency is None or not self.break_even:
            return None
        if candidate.name not in self._searches:
            decomposition, info = candidate.decomposition, candidate.info
            paying = [r for r in self.candidate_ranks(candidate) if decomposition.pays_off(info, r)]
            self._searches[candidate.name] = self.latency.search(info, decomposition, paying) if paying else None
        return self._searches[candidate.name]

    def guard_note(self, candidate: Candidate) -> str:
        """What the latency guard allows for this layer (empty without a latency guard): for dense choices."""
        search = self._latency_search(candidate)
        if search is None:
            return ""
        dense_seconds, _, fastest = search
        if fastest is None:
            return f"; latency guard: no rank measured faster than the dense layer ({dense_seconds * 1e3:.3f} ms)"
        return f"; latency guard: ranks up to {fastest} measured faster than the dense layer"

    def finalize(self, candidate: Candidate, rank: Rank, why: str) -> Choice:
        """Round ``rank``, then keep the layer dense if the guard refuses that rank."""
        rank = self.rounded(candidate, rank)
        if self.round_to > 1:
            why = f"{why}; rounded to a multiple of {self.round_to}"
        refusal = self._refusal(candidate, rank)
        return Choice(rank, why) if refusal is None else Choice(None, f"{why}; {refusal}")


class Selector(ABC):
    """Chooses ranks for a set of layers. ``spec`` is the string that recreates it (``parse_selector``).

    ``needs_data`` selectors measure the model: they get it and a task through ``bind`` before ``choose``.
    ``summary`` holds what a selector wants recorded in the plan's meta (e.g. validation checks).
    """

    spec: str
    uses_break_even: bool = True
    needs_data: bool = False
    summary: dict[str, Any]

    def bind(self, model: nn.Module, task: Any) -> None:
        """Give a data-driven selector the model and the task (calibration, loss, validation) it measures."""
        self.model, self.task = model, task

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        """A choice for every candidate, keyed by layer name."""

    def finish(self, model: nn.Module) -> dict[str, Any] | None:
        """Adjust the built model the way the selector measured its plans (``compress`` calls it after
        factorizing); return what was done, for the plan's meta, or None when nothing was."""
        return None


class PerLayerSelector(Selector):
    """A selector that decides each layer on its own."""

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        return {c.name: self.choose_layer(c, policy) for c in candidates}

    @abstractmethod
    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        """The choice for one layer."""
