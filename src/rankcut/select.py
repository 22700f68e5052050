"""Rank selectors: each turns the factorizable layers of a model into per-layer ranks with a stated reason."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rankcut.inventory import Candidate
from rankcut.layers import Rank


@dataclass(frozen=True)
class Choice:
    """A selector's decision for one layer: a rank (None: keep it dense) and how it was reached."""

    rank: Rank | None
    reason: str


@dataclass(frozen=True)
class RankPolicy:
    """Rules every selector's ranks pass through: hardware rounding and the break-even guard."""

    round_to: int = 1
    break_even: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.round_to, int) or self.round_to < 1:
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

    def finalize(self, candidate: Candidate, rank: Rank, why: str) -> Choice:
        """Round ``rank``, then keep the layer dense if that rank cannot reduce its params or MACs."""
        decomposition, info = candidate.decomposition, candidate.info
        rank = self.rounded(candidate, rank)
        if self.round_to > 1:
            why = f"{why}; rounded to a multiple of {self.round_to}"
        if self.break_even and not decomposition.pays_off(info, rank):
            params = decomposition.params(info, rank) / info.dense_params
            macs = f", {decomposition.macs(info, rank) / info.dense_macs:.0%} of MACs" if info.dense_macs else ""
            return Choice(None, f"{why}; rank {rank} would keep {params:.0%} of params{macs}: not worth it, kept dense")
        return Choice(rank, why)


class Selector(ABC):
    """Chooses ranks for a set of layers. ``spec`` is the string that recreates it (``parse_selector``)."""

    spec: str
    uses_break_even: bool = True

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        """A choice for every candidate, keyed by layer name."""


class PerLayerSelector(Selector):
    """A selector that decides each layer on its own."""

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        return {c.name: self.choose_layer(c, policy) for c in candidates}

    @abstractmethod
    def choose_layer(self, candidate: Candidate, policy: RankPolicy) -> Choice:
        """The choice for one layer."""


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


def _number(kind: str, text: str, convert: Callable[[str], float | int]) -> float | int:
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"{kind}: expected a number after ':', got {text!r}") from None


SELECTORS: dict[str, Callable[[str | None], Selector]] = {
    "full": lambda arg: FullRank(),
    "fixed": lambda arg: FixedFraction(_number("fixed", arg or "", float)),
    "rank": lambda arg: FixedRank(_number("rank", arg or "", int)),
}


def parse_selector(select: str | Selector) -> Selector:
    """A selector from a spec string such as ``"fixed:0.5"``, ``"rank:32"`` or ``"full"`` (or a selector object)."""
    if isinstance(select, Selector):
        return select
    if not isinstance(select, str):
        raise TypeError(f"select must be a string like 'fixed:0.5' or a Selector, got {type(select).__name__}")
    kind, _, arg = select.partition(":")
    factory = SELECTORS.get(kind.strip().lower())
    if factory is None:
        raise ValueError(f"unknown selector {select!r}; available: {', '.join(sorted(SELECTORS))} (e.g. 'fixed:0.5')")
    return factory(arg.strip() or None)
