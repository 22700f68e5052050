"""A global budget: keep a fraction of the factorizable params (or MACs), spread across layers by their spectra."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from rankcut.inventory import Candidate
from rankcut.layers import Rank
from rankcut.selectors.base import Choice, RankPolicy, Selector

METRICS = ("params", "macs")


@dataclass(frozen=True)
class _Option:
    """One way to keep a layer: a rank (None: dense), its cost and the share of its energy it drops."""

    rank: Rank | None
    cost: int
    error: float


def _lower_hull(options: list[_Option]) -> list[_Option]:
    """The Pareto-optimal options on the lower convex hull of (cost, error), most expensive first."""
    front: list[_Option] = []
    for option in sorted(options, key=lambda o: (o.cost, o.error)):
        if not front or option.error < front[-1].error:  # a dearer option must drop less energy to be useful
            front.append(option)
    hull: list[_Option] = []
    for option in reversed(front):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment from a to option
            if (b.error - a.error) * (a.cost - option.cost) >= (option.error - a.error) * (a.cost - b.cost):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


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
        info, decomposition = candidate.info, candidate.decomposition
        if self.metric == "params":
            return info.dense_params if rank is None else decomposition.params(info, rank)
        return info.dense_macs if rank is None else decomposition.macs(info, rank)

    def _options(self, candidate: Candidate, policy: RankPolicy) -> list[_Option]:
        """Dense, plus every (rounded) rank that pays off and respects min_keep/max_keep."""
        decomposition, info = candidate.decomposition, candidate.info
        dense = self._cost(candidate, None)
        basis = candidate.basis()
        ranks = dict.fromkeys(policy.rounded(candidate, r) for r in decomposition.ranks_by_size(info))
        options = [_Option(None, dense, 0.0)] if self.max_keep >= 1 else []
        for rank in ranks:
            cost = self._cost(candidate, rank)
            if decomposition.pays_off(info, rank) and self.min_keep * dense <= cost <= self.max_keep * dense:
                options.append(_Option(rank, cost, decomposition.squared_error_estimate(basis, rank)))
        if not options:
            raise ValueError(f"budget: layer {candidate.name!r} has no rank within min_keep={self.min_keep}, "
                             f"max_keep={self.max_keep} that pays off; widen them or ignore the layer")
        return options

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        if self.metric == "macs" and any(c.info.output_positions == 0 for c in candidates):
            raise ValueError("budget:macs needs MACs per layer: pass example_inputs (or a task) to compress")
        total = sum(self._cost(c, None) for c in candidates)
        target = self.fraction * total
        options = {c.name: self._options(c, policy) for c in candidates}
        current = {name: _lower_hull(opts)[0] for name, opts in options.items()}
        spent = sum(option.cost for option in current.values())
        cheapest = sum(min(o.cost for o in opts) for opts in options.values())
        if cheapest > target:
            raise ValueError(f"{self.spec} cannot be met: even the smallest allowed ranks keep "
                             f"{cheapest / total:.1%} of the factorizable {self.metric}")
        steps = []
        for name, opts in options.items():
            for index, (upper, lower) in enumerate(itertools.pairwise(_lower_hull(opts))):
                slope = (lower.error - upper.error) / (upper.cost - lower.cost)
                steps.append((slope, name, index, lower))
        last = None
        for _slope, name, _index, lower in sorted(steps, key=lambda step: step[:3]):
            if spent <= target:
                break
            spent -= current[name].cost - lower.cost
            current[name], last = lower, name
        if last is not None:  # give back what the last step overshot: its largest option that still fits
            spare = target - spent + current[last].cost
            fitting = [o for o in options[last] if o.cost <= spare]
            current[last] = min(fitting, key=lambda o: (o.error, -o.cost))
        return {c.name: self._choice(c, current[c.name], policy) for c in candidates}

    def _choice(self, candidate: Candidate, option: _Option, policy: RankPolicy) -> Choice:
        why = (f"{self.spec}: global allocation by least energy lost per {self.metric[:-1]} saved; "
               f"this layer keeps {option.cost / self._cost(candidate, None):.1%} of its {self.metric}")
        if option.rank is None:
            return Choice(None, f"{why} (dense)")
        return policy.finalize(candidate, option.rank, f"{why}, dropping {option.error:.2%} of its energy")
