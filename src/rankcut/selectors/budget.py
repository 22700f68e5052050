"""A global budget: keep a fraction of the factorizable params (or MACs), spread across layers by their spectra."""

from __future__ import annotations

from collections.abc import Sequence

from rankcut.inventory import Candidate
from rankcut.layers import Rank
from rankcut.selectors.allocation import Option, walk_to_budget
from rankcut.selectors.base import Choice, RankPolicy, Selector
from rankcut.tasks.base import PASS_EXAMPLE_INPUTS

METRICS = ("params", "macs")


def layer_cost(candidate: Candidate, rank: Rank | None, metric: str) -> int:
    """A layer's params or MACs at ``rank`` (None: dense): what budgets count."""
    info, decomposition = candidate.info, candidate.decomposition
    if metric == "params":
        return info.dense_params if rank is None else decomposition.params(info, rank)
    return info.dense_macs if rank is None else decomposition.macs(info, rank)


class Budget(Selector):
    """Keep ``fraction`` of the factorizable layers' params (or MACs), allocated across layers.

    Rule: minimize the sum over layers of the relative squared weight error (the dropped share of each
    spectrum's energy) subject to the budget. Layers step down the lower convex hull of their
    (cost, error) curves in order of least error added per unit of cost saved, then the last layer moved
    takes the largest rank that still fits. ``min_keep``/``max_keep`` bound each layer's kept share.
    """

    def __init__(self, fraction: float, metric: str = "params", min_keep: float = 0.0, max_keep: float = 1.0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"budget: the fraction kept must be in (0, 1], got {fraction}")
        if metric not in METRICS:
            raise ValueError(f"budget: the metric must be one of {METRICS}, got {metric!r}")
        if not 0 <= min_keep <= max_keep <= 1:
            raise ValueError(f"budget: need 0 <= min_keep <= max_keep <= 1, got {min_keep}, {max_keep}")
        self.fraction, self.metric, self.min_keep, self.max_keep = fraction, metric, min_keep, max_keep
        self.spec = f"budget:{metric}={fraction:g}"

    def _cost(self, candidate: Candidate, rank: Rank | None) -> int:
        return layer_cost(candidate, rank, self.metric)

    def _options(self, candidate: Candidate, policy: RankPolicy) -> list[Option]:
        """Dense, plus every (rounded) rank that pays off and respects min_keep/max_keep."""
        decomposition = candidate.decomposition
        dense = self._cost(candidate, None)
        basis = candidate.basis()
        options = [Option(None, dense, 0.0)] if self.max_keep >= 1 else []
        for rank in policy.candidate_ranks(candidate):
            cost = self._cost(candidate, rank)
            if policy.pays_off(candidate, rank) and self.min_keep * dense <= cost <= self.max_keep * dense:
                options.append(Option(rank, cost, decomposition.squared_error_estimate(basis, rank)))
        if not options:
            raise ValueError(f"budget: layer {candidate.name!r} has no rank within min_keep={self.min_keep}, "
                             f"max_keep={self.max_keep} that pays off; widen them or ignore the layer")
        return options

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        if self.metric == "macs" and any(c.info.output_positions == 0 for c in candidates):
            raise ValueError(f"budget:macs needs MACs per layer: {PASS_EXAMPLE_INPUTS}")
        total = sum(self._cost(c, None) for c in candidates)
        target = self.fraction * total
        options = {c.name: self._options(c, policy) for c in candidates}
        cheapest = sum(min(o.cost for o in opts) for opts in options.values())
        if cheapest > target:
            raise ValueError(f"{self.spec} cannot be met: even the smallest allowed ranks keep "
                             f"{cheapest / total:.1%} of the factorizable {self.metric}")
        current = walk_to_budget(options, target)
        return {c.name: self._choice(c, current[c.name], policy) for c in candidates}

    def _choice(self, candidate: Candidate, option: Option, policy: RankPolicy) -> Choice:
        why = (f"{self.spec}: global allocation by least energy lost per {self.metric[:-1]} saved; "
               f"this layer keeps {option.cost / self._cost(candidate, None):.1%} of its {self.metric}")
        if option.rank is None:
            return Choice(None, f"{why} (dense){policy.guard_note(candidate)}")
        return policy.finalize(candidate, option.rank, f"{why}, dropping {option.error:.2%} of its energy")
