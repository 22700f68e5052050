"""Allocation across layers: each layer offers options (cost, error); walk them from dense to small by least
error added per unit of cost saved. Shared by the energy-based budget and the loss-aware selectors, with the
search along such a path that ``compact`` runs (plans after a number of moves, the last one that passes)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankcut.layers import Components, Fit, Rank


@dataclass(frozen=True)
class Option:
    """One way to keep a layer: a rank (None: dense), its cost, the error it adds, and optional extra data."""

    rank: Rank | None
    cost: int
    error: float
    components: Components | Fit | None = None  # kept components, or Fit: the decomposition's own fit
    note: Any = None


def lower_hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (cost, error) from the dearest option (the start) to the cheapest.

    The start is kept even when a cheaper option has less error, so every walk begins at the layer as it is;
    along the hull the error added per unit of cost saved only grows.
    """
    by_cost: dict[int, Option] = {}
    for option in options:  # at equal cost only the least error matters
        if option.cost not in by_cost or option.error < by_cost[option.cost].error:
            by_cost[option.cost] = option
    hull: list[Option] = []
    for option in sorted(by_cost.values(), key=lambda o: -o.cost):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment from a to option
            if (b.error - a.error) * (a.cost - option.cost) >= (option.error - a.error) * (a.cost - b.cost):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def greedy_path(options: Mapping[str, list[Option]]) -> tuple[dict[str, Option], list[tuple[str, Option]]]:
    """The starting option of every layer (its dearest hull point) and the moves, best error-per-cost first.

    Applying the first ``j`` moves gives the j-th plan of the path; every prefix is optimal for its cost
    among plans on the layers' convex hulls (the greedy solution of the multiple-choice knapsack).
    """
    hulls = {name: lower_hull(opts) for name, opts in options.items()}
    steps = []
    for name, hull in hulls.items():
        for index, (upper, lower) in enumerate(itertools.pairwise(hull)):
            slope = (lower.error - upper.error) / (upper.cost - lower.cost)
            steps.append((slope, name, index, lower))
    steps.sort(key=lambda step: step[:3])
    return {name: hull[0] for name, hull in hulls.items()}, [(name, option) for _, name, _, option in steps]


def walk_to_budget(options: Mapping[str, list[Option]], target: float) -> dict[str, Option]:
    """Follow the greedy path until the total cost fits ``target``, then spend what is left of the budget.

    Hull steps can be long (a layer may jump several ranks at once), so the walk usually ends below the
    target; the leftover is filled by repeatedly growing the layer whose larger option removes the most error
    per unit of cost and still fits. Growing a layer never adds error: where errors are signed estimates (the
    loss-aware selectors), a larger option can be predicted worse than a smaller one, and is then left alone.
    """
    current, steps = greedy_path(options)
    spent = sum(option.cost for option in current.values())
    for name, lower in steps:
        if spent <= target:
            break
        spent -= current[name].cost - lower.cost
        current[name] = lower
    while True:
        spare = target - spent
        best = None
        for name, opts in options.items():
            for option in opts:
                extra = option.cost - current[name].cost
                if 0 < extra <= spare and option.error < current[name].error:
                    ratio = (option.error - current[name].error) / extra
                    if best is None or ratio < best[0]:
                        best = (ratio, name, option)
        if best is None:
            return current
        _, name, option = best
        spent += option.cost - current[name].cost
        current[name] = option


def plan_after(start: Mapping[str, Option], steps: Sequence[tuple[str, Option]], position: int) -> dict[str, Option]:
    """The plan after the first ``position`` moves of a greedy path (``greedy_path``)."""
    current = dict(start)
    for name, lower in steps[:position]:
        current[name] = lower
    return current


def feasible_position(start: Mapping[str, Option], steps: Sequence[tuple[str, Option]]) -> int:
    """Number of greedy moves taken before the path's total error would rise above zero (signed errors)."""
    current = dict(start)
    total = sum(option.error for option in current.values())
    for index, (name, lower) in enumerate(steps):
        total += lower.error - current[name].error
        if total > 0:
            return index
        current[name] = lower
    return len(steps)


def last_passing(passes: Callable[[int], bool], guess: int, low: int, high: int, checks: int) -> tuple[int, int]:
    """Narrow ``[low, high)`` (``low`` passes, ``high`` fails) to the last passing position with at most
    ``checks`` calls of ``passes``, and return it with the first failing one.

    ``guess`` is tried first. Then positions are tried galloping up from the last passing one (low+1, +2,
    +4 …): from ``low`` when the guess fails, which costs few calls when the answer is near ``low`` (as when
    a model has nothing to give), and from the guess when it passes, which costs few when the answer is near
    the guess. The bracket found is then bisected.
    """
    calls = 0

    def check(position: int) -> bool:
        nonlocal calls
        calls += 1
        return passes(position)

    if low < guess < high and checks > 0:
        if check(guess):
            low = guess
        else:
            high = guess
        step = 1
        while calls < checks and low + step < high:
            if not check(low + step):
                high = low + step
                break
            low, step = low + step, 2 * step
    while calls < checks and high - low > 1:
        middle = (low + high) // 2
        if check(middle):
            low = middle
        else:
            high = middle
    return low, high
