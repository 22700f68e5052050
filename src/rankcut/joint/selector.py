"""Loss-aware joint rank selection: ``lossless`` (best loss at a size) and ``compact`` (smallest size at no loss).

Steps, all without fine-tuning and without touching the test split:
1. one forward/backward pass over calibration batches gives every layer's per-component loss statistics;
2. each layer gets a curve "loss change vs components removed" (Taylor prediction), checked by real probes at
   a few sizes; the trusted range ends where prediction and measurement part;
3. layers are allocated jointly along the greedy path of least loss added per parameter (or MAC) saved; any
   chosen size outside a layer's trusted range is measured and the allocation redone;
4. the result is checked with the task's real evaluation on the validation split: ``compact`` bisects along
   the path until the validation loss and metric are no worse than the original's; ``lossless`` keeps the
   best of its plan and the energy-based budget plan at the same size.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut.distributed import Group
from rankcut.inventory import Candidate
from rankcut.joint import memo
from rankcut.joint.curves import ORDERS, LayerCurve
from rankcut.joint.probing import LossProbe, substituted
from rankcut.joint.statistics import ComponentStats, gather_statistics
from rankcut.selectors.allocation import Option, greedy_path, walk_to_budget
from rankcut.selectors.base import Choice, RankPolicy, Selector
from rankcut.selectors.budget import METRICS, Budget, layer_cost

MODES = ("lossless", "compact")
CRITERIA = ("loss", "metric")


class LossAware(Selector):
    """Chooses ranks (and which components to keep) from the model's loss on calibration data.

    ``mode="lossless"`` needs ``fraction``: the share of the factorizable ``metric`` (params or MACs) kept.
    ``mode="compact"`` finds the smallest model whose validation loss and metric are no worse than the
    original's (``tolerance`` loosens the loss check, as a fraction of the original loss);
    ``criterion="metric"`` asks only that the validation metric be no worse (e.g. accuracy not below).
    ``order="taylor"`` lets a layer drop any component, not only the smallest ones; ``"spectrum"`` truncates.
    """

    needs_data = True

    def __init__(self, mode: str = "compact", fraction: float | None = None, metric: str = "params", *,
                 calibration_samples: int = 512, batch_size: int = 64, probe_samples: int = 512,
                 order: str = "spectrum", tolerance: float = 0.0, max_rounds: int = 3, max_evaluations: int = 10,
                 criterion: str = "loss", progress: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "lossless" and (fraction is None or not 0 < fraction <= 1):
            raise ValueError(f"lossless needs the fraction of factorizable {metric} kept, in (0, 1]; got {fraction}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if min(calibration_samples, batch_size, probe_samples) < 1:
            raise ValueError("calibration_samples, batch_size and probe_samples must be positive")
        self.mode, self.fraction, self.metric, self.order = mode, fraction, metric, order
        self.calibration_samples, self.batch_size = calibration_samples, batch_size
        self.probe_samples = min(probe_samples, calibration_samples)
        self.tolerance, self.max_rounds, self.max_evaluations = tolerance, max_rounds, max_evaluations
        self.progress, self.criterion = progress, criterion
        self.spec = (f"lossless:{metric}={fraction:g}" if mode == "lossless"
                     else "compact" if criterion == "loss" else f"compact:{criterion}")
        self.model: nn.Module | None = None
        self.task: Any = None
        self.summary: dict[str, Any] = {}
        self._active_fraction: float | None = fraction

    # -- the steps --------------------------------------------------------------------------------------

    def _bar(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        return tqdm(items, desc=desc, total=total, disable=not self.progress, leave=False)

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        if self.model is None or self.task is None:
            raise ValueError(f"{self.spec} measures the model's loss: pass a task (task=... or --task) to compress")
        for candidate in candidates:
            if not candidate.decomposition.supports_components:
                raise ValueError(f"{self.spec}: layer {candidate.name!r} uses {candidate.decomposition.name}; the "
                                 "loss-aware selectors work on the svd decomposition (use decomposition='svd')")
            if candidate.rank_limit is not None:
                raise ValueError(f"{self.spec}: layer {candidate.name!r} has a partial randomized SVD; the loss "
                                 "statistics need every component: raise randomized_above (--randomized-above)")
        if self.metric == "macs" and any(c.info.output_positions == 0 for c in candidates):
            raise ValueError(f"{self.spec} needs MACs per layer: pass example_inputs (or a task) to compress")
        start = time.perf_counter()
        group = Group.current()
        batches = list(self.task.calibration_batches(self.calibration_samples, self.batch_size))
        probe_batches = batches[: max(1, -(-self.probe_samples // self.batch_size))]
        probe = LossProbe(self.model, probe_batches, self.task.loss, group)
        disk = candidates[0].store.disk if candidates else None
        key = (memo.statistics_key(self.model, [c.name for c in candidates], batches,
                                   f"{self.probe_samples}/{self.order}") if disk is not None else "")
        cached = memo.load(disk, key, probe.baseline) if disk is not None else None
        if not group.all_agree(cached is not None):
            cached = None
            stats = self._statistics(candidates, batches, group)
            measured: dict[str, dict[int, float]] = {}
        else:
            stats, measured = cached
        inert = [c.name for c in candidates if c.name not in stats]
        self._active_fraction = self._fraction_of_active(candidates, stats)
        candidates = [c for c in candidates if c.name in stats]
        by_name = {c.name: c for c in candidates}
        tolerance = 1e-3 * abs(probe.baseline)
        curves = {c.name: LayerCurve.of(c, stats[c.name], self.order) for c in candidates}
        for name, table in measured.items():
            curves[name].probes.update(table)
        self._probe_initial(curves, probe)
        statistics_seconds = time.perf_counter() - start
        chosen = self._allocate(curves, policy, probe, tolerance)
        checks: list[dict[str, Any]] = []
        chosen, source = self._verify(by_name, curves, policy, chosen, checks)
        self._measure([(curves[name], option.note) for name, option in chosen.items()
                       if option.rank is not None and source == "loss-aware"], probe, "measuring the plan")
        kept = {name: option.components for name, option in chosen.items() if option.rank is not None}
        if disk is not None:  # every process: with a cache folder per node, each node keeps its own entry
            memo.save(disk, key, stats, {name: curve.probes for name, curve in curves.items()}, probe.baseline)
        self.summary = {
            "mode": self.mode, "criterion": self.criterion, "order": self.order, "plan_source": source,
            "calibration_samples": next(iter(stats.values())).a.shape[0], "probe_samples": self.probe_samples,
            "probe_measurements": probe.measurements, "calibration_loss": probe.baseline,
            "statistics_cache": "off" if disk is None else "hit" if cached is not None else "miss",
            "predicted_loss_change": sum(option.error for option in chosen.values()),
            "measured_loss_change": probe.change(by_name, kept),
            "validation_checks": checks,
            "seconds": {"statistics_and_probes": round(statistics_seconds, 2),
                        "total": round(time.perf_counter() - start, 2)},
        }
        choices = {name: self._choice(curves[name], chosen[name], tolerance, source, policy) for name in by_name}
        for name in inert:
            choices[name] = Choice(None, f"{self.spec}: kept dense, the task's loss does not depend on this layer "
                                         "(e.g. a pooler the task does not use)")
        return choices

    def _statistics(self, candidates: Sequence[Candidate], batches: Sequence[Any],
                    group: Group) -> dict[str, ComponentStats]:
        """Every layer's statistics; with several processes each takes a share of the batches, rows are gathered."""
        mine = group.share(batches)
        local = gather_statistics(self.model, candidates, mine, self.task.loss,
                                  lambda items: self._bar(items, "loss statistics", len(mine)))
        if group.world == 1:
            return local
        stats = {}
        for candidate in candidates:
            own = local.get(candidate.name)
            rows = own.a if own is not None else torch.empty(0, candidate.basis().max_rank, dtype=torch.float64)
            gathered = group.gather_rows(rows)
            if gathered.shape[0]:
                stats[candidate.name] = ComponentStats(candidate.name, gathered)
        return stats

    def _fraction_of_active(self, candidates: Sequence[Candidate], stats: Mapping[str, Any]) -> float | None:
        """The lossless budget as a share of the layers the loss depends on (the others stay dense)."""
        if self.fraction is None:
            return None
        total = sum(self._cost(c, None) for c in candidates)
        inert = sum(self._cost(c, None) for c in candidates if c.name not in stats)
        if inert >= self.fraction * total:
            raise ValueError(f"{self.spec} cannot be met: layers the loss does not depend on already hold "
                             f"{inert / total:.1%} of the factorizable {self.metric}")
        return (self.fraction * total - inert) / (total - inert)

    def _probe_initial(self, curves: Mapping[str, LayerCurve], probe: LossProbe) -> None:
        """Measure each layer alone at half and a quarter of its params kept (where those ranks exist)."""
        todo = []
        for curve in curves.values():
            info, decomposition = curve.candidate.info, curve.candidate.decomposition
            for share in (0.5, 0.25):
                rank = decomposition.rank_for_params(info, int(share * info.dense_params))
                if rank is not None:
                    todo.append((curve, curve.max_rank - rank))
        self._measure(todo, probe, "probing layers")

    def _measure(self, todo: Sequence[tuple[LayerCurve, int]], probe: LossProbe, desc: str) -> None:
        for curve, removed in self._bar(todo, desc):
            if removed not in curve.probes:
                name = curve.candidate.name
                curve.probes[removed] = probe.change({name: curve.candidate}, {name: curve.kept(removed)})

    def _options(self, curve: LayerCurve, policy: RankPolicy) -> list[Option]:
        """Dense, plus every (rounded) rank that pays off, with its estimated loss change."""
        options = [Option(None, self._cost(curve.candidate, None), 0.0)]
        for rank in policy.candidate_ranks(curve.candidate):
            if policy.pays_off(curve.candidate, rank):
                removed = curve.max_rank - rank
                options.append(Option(rank, self._cost(curve.candidate, rank), curve.estimate(removed),
                                      curve.kept(removed), removed))
        return options

    def _cost(self, candidate: Candidate, rank: int | None) -> int:
        return layer_cost(candidate, rank, self.metric)

    def _select(self, options: Mapping[str, list[Option]]) -> dict[str, Option]:
        """The plan the estimates favour: within the budget (lossless) or at no predicted loss (compact)."""
        if self.mode == "lossless":
            total = sum(opts[0].cost for opts in options.values())
            cheapest = sum(min(o.cost for o in opts) for opts in options.values())
            if cheapest > self._active_fraction * total:
                raise ValueError(f"{self.spec} cannot be met: even the smallest ranks that pay off keep "
                                 f"{cheapest / total:.1%} of the factorizable {self.metric}")
            return walk_to_budget(options, self._active_fraction * total)
        return self._path_plan(options, None)

    def _path_plan(self, options: Mapping[str, list[Option]], position: int | None) -> dict[str, Option]:
        """The plan after ``position`` greedy moves (None: as far as the predicted total change stays ≤ 0)."""
        current, steps = greedy_path(options)
        if position is None:
            position = self._feasible_position(current, steps)
        for name, lower in steps[:position]:
            current[name] = lower
        return current

    @staticmethod
    def _feasible_position(start: Mapping[str, Option], steps: Sequence[tuple[str, Option]]) -> int:
        """Number of greedy moves taken before the predicted total loss change would rise above zero."""
        current = dict(start)
        total = sum(option.error for option in current.values())
        for index, (name, lower) in enumerate(steps):
            total += lower.error - current[name].error
            if total > 0:
                return index
            current[name] = lower
        return len(steps)

    def _allocate(self, curves: Mapping[str, LayerCurve], policy: RankPolicy, probe: LossProbe,
                  tolerance: float) -> dict[str, Option]:
        """Allocate, measure chosen sizes outside their layer's trusted range, and allocate again."""
        for _ in range(self.max_rounds):
            options = {name: self._options(curve, policy) for name, curve in curves.items()}
            chosen = self._select(options)
            unknown = [(curves[name], option.note) for name, option in chosen.items()
                       if option.rank is not None and not curves[name].known(option.note, tolerance)]
            if not unknown:
                break
            self._measure(unknown, probe, "measuring chosen ranks")
        return chosen

    def _verify(self, candidates: Mapping[str, Candidate], curves: Mapping[str, LayerCurve], policy: RankPolicy,
                chosen: dict[str, Option], checks: list[dict[str, Any]]) -> tuple[dict[str, Option], str]:
        """Check plans with the task's real evaluation on the validation split; return the kept one and its source.

        lossless: the better (metric, then loss) of this plan and the energy-based budget plan of the same size.
        compact: bisection along the greedy path for the longest prefix that passes ``_passes``, starting from
        the prefix the estimates call lossless.
        """
        baseline = self._validate(candidates, {}, "original", checks)
        if self.mode == "lossless":
            alternative = self._energy_plan(candidates, policy)
            ours = self._validate(candidates, chosen, "loss-aware", checks)
            theirs = self._validate(candidates, alternative, "energy budget", checks)
            if self._score(ours) >= self._score(theirs):
                return chosen, "loss-aware"
            return alternative, "energy budget"
        options = {name: self._options(curve, policy) for name, curve in curves.items()}
        start, steps = greedy_path(options)
        low, high = 0, len(steps) + 1  # the empty prefix (all dense) passes by definition
        position = self._feasible_position(start, steps)
        for _ in range(self.max_evaluations):
            if position == 0:
                break
            plan = self._path_plan(options, position)
            if self._passes(self._validate(candidates, plan, f"path step {position}/{len(steps)}", checks), baseline):
                low = position
            else:
                high = position
            if high - low <= 1:
                break
            position = (low + high) // 2
        return self._path_plan(options, low), "loss-aware"

    def _energy_plan(self, candidates: Mapping[str, Candidate], policy: RankPolicy) -> dict[str, Option]:
        """The energy-based budget plan at the same size, as options (truncation: leading components)."""
        budget = Budget(self._active_fraction, self.metric).choose(list(candidates.values()), policy)
        plan = {}
        for name, choice in budget.items():
            rank = choice.rank
            components = tuple(range(rank)) if rank is not None else None
            plan[name] = Option(rank, self._cost(candidates[name], rank), 0.0, components, choice.reason)
        return plan

    def _validate(self, candidates: Mapping[str, Candidate], plan: Mapping[str, Option], label: str,
                  checks: list[dict[str, Any]]) -> dict[str, float]:
        kept = {name: option.components for name, option in plan.items() if option.rank is not None}
        with substituted(candidates, kept):
            metrics = Group.current().broadcast_metrics(self.task.evaluate(self.model, "validation"))
        total = sum(option.cost for option in plan.values()) if plan else None
        checks.append({"plan": label, "validation": metrics, "cost": total})
        return metrics

    def _score(self, metrics: Mapping[str, float]) -> tuple[float, float]:
        return metrics.get(self.task.metric_name, 0.0), -metrics.get("loss", 0.0)

    def _passes(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
        """No loss: the validation metric not below the original's and, unless ``criterion="metric"``, the
        validation loss not above it (plus tolerance)."""
        loss_ok = ("loss" not in baseline or self.criterion == "metric"
                   or metrics["loss"] <= baseline["loss"] + self.tolerance * abs(baseline["loss"]))
        name = self.task.metric_name
        return loss_ok and (name == "loss" or metrics[name] >= baseline[name])

    def _choice(self, curve: LayerCurve, option: Option, tolerance: float, source: str,
                policy: RankPolicy) -> Choice:
        if option.rank is None:
            return Choice(None, f"{self.spec}: kept dense (no size of this layer paid for its loss change)"
                                f"{policy.guard_note(curve.candidate)}")
        if source != "loss-aware":  # the energy budget plan won the validation check
            return Choice(option.rank, f"{self.spec}: energy budget plan, better on validation; {option.note}")
        removed = option.note
        leading = option.components == tuple(range(option.rank))
        measured = curve.probes.get(removed)
        why = (f"{self.spec}: drop {removed} of {curve.max_rank} components"
               f"{'' if leading else ' (not only the smallest)'}; ΔL predicted {float(curve.predicted[removed]):+.4f}"
               f" (Taylor), estimated {option.error:+.4f}")
        if measured is not None:
            why += f", measured {measured:+.4f} (layer alone)"
        why += f"; Taylor trusted up to {curve.trusted(tolerance)} removed"
        return Choice(option.rank, why, None if leading else option.components)
