"""Loss-aware joint rank selection: ``lossless`` (best loss at a size) and ``compact`` (smallest size at no loss).

Steps, all without fine-tuning and without touching the test split:
1. one forward/backward pass over calibration batches gives every layer's per-component loss statistics;
2. each layer gets a curve "loss change vs components removed" (Taylor prediction; a tucker2 layer's curve
   follows its rank-pair path), checked by real probes (lossless: at half and a quarter of each layer's
   params); the trusted range ends where prediction and measurement part;
3. layers are allocated jointly along the greedy path of least loss added per parameter (or MAC) saved, each
   cut charged its estimate plus ``confidence`` standard errors (so calibration noise cannot pass for a gain);
   any chosen size outside a layer's trusted range is measured and the allocation redone (after the last
   round, among measured or trusted sizes only);
4. ``lossless`` measures its plan and the energy-based budget plan of the same size whole, on the probe
   batches, and re-expands the loss around the better one: statistics and probes are taken again with the
   model at that plan, each layer's curve now relative to it (fewer or more components), and the budget is
   allocated again; kept while the whole plan's measured loss falls. Layers interact: cuts that are cheap
   one at a time can be dear together (MiniLM at 30% kept: 0.07 summed alone, 0.48 together);
5. the result is checked with the task's real evaluation on the validation split: ``compact`` searches the
   path (first the cuts predicted to change nothing, then the greedy path), first on the probe batches' loss,
   then on validation, for the longest prefix whose loss (within a 1e-5 tolerance) and metric are no worse
   than the original's; ``lossless`` keeps the better of its plan and the energy-based budget
   plan at the same size;
6. with ``recalibrate``, whole plans are measured, and the model is built, with batch-norm statistics
   corrected on the calibration samples (``rankcut.recalibration``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut.distributed import Group
from rankcut.inventory import Candidate
from rankcut.joint import memo
from rankcut.joint.curves import ORDERS, LayerCurve
from rankcut.joint.probing import LossProbe, mean_loss, spread_batches, substituted, truncation_key
from rankcut.joint.statistics import ComponentStats, gather_statistics
from rankcut.layers import Fit, Rank
from rankcut.linalg import Spectrum
from rankcut.recalibration import BatchNormRecalibration, batch_norms
from rankcut.selectors.allocation import (
    Option,
    feasible_position,
    greedy_path,
    last_passing,
    lower_hull,
    plan_after,
    walk_to_budget,
)
from rankcut.selectors.base import Choice, RankPolicy, Selector
from rankcut.selectors.budget import METRICS, Budget, layer_cost
from rankcut.tasks.base import BATCH_SIZE, CALIBRATION_SAMPLES, PASS_EXAMPLE_INPUTS, batch_samples

MODES = ("lossless", "compact")
LOSS_AWARE, ENERGY, REEXPANDED = "loss-aware", "energy budget", "re-expanded"  # where a plan came from
CRITERIA = ("loss", "metric")
NO_CHANGE = 1e-5  # compact: a loss or metric change within this share of the original counts as none (tolerance)


class CompactPath(NamedTuple):
    """compact's path: every layer's starting option, the moves (the free cuts first), and the search's guess."""

    start: dict[str, Option]
    steps: list[tuple[str, Option]]
    free: int  # the first ``free`` moves are the cuts predicted to change nothing
    guess: int  # where the moves' summed estimates turn positive


@dataclass(frozen=True)
class PathSearch:
    """Where compact's search along its path ended: the last position accepted and the first one refused, and why."""

    path: CompactPath
    accepted: int
    refused: int | None  # None: the whole path passed
    why: str  # the refusal, from the first check that refused that position

    def first_step(self, name: str) -> int | None:
        """The position (1-based) of the path's first move of layer ``name``, or None when it has none."""
        return next((index + 1 for index, (layer, _) in enumerate(self.path.steps) if layer == name), None)

    def summary(self) -> dict[str, Any]:
        """For the plan's meta: the path's length, its free cuts, the guess, and where the search ended."""
        return {"steps": len(self.path.steps), "free_steps": self.path.free, "guess": self.path.guess,
                "accepted": self.accepted, "refused": self.refused, "why": self.why if self.refused else None}


class LossAware(Selector):
    """Chooses ranks (and which components to keep) from the model's loss on calibration data.

    ``mode="lossless"`` needs ``fraction``: the share of the factorizable ``metric`` (params or MACs) kept.
    ``mode="compact"`` finds the smallest model whose validation loss and metric are no worse than the
    original's, where a change within ``tolerance`` of the original value (default 1e-5, far below what any
    metric moves by) counts as none, so that a change decided by the last float digits cannot stop it;
    ``criterion="metric"`` asks only that the validation metric be no worse (e.g. accuracy not below).
    ``order="taylor"`` lets a layer drop any component, not only the smallest ones; ``"spectrum"`` truncates
    (svd layers; a tucker2 layer always follows its path of rank pairs, leading components kept).
    ``confidence`` (default 2): standard errors of the per-sample loss change added to every cut's estimate
    before layers compete (an upper confidence bound); 0 trusts the calibration means as they are.
    ``probe_samples`` (default: every calibration sample): the calibration samples each probe measures the
    loss on (whole batches, evenly spaced over the calibration batches). Fewer are faster, but compact's
    calibration check then refuses sizes on sampling noise (ResNet-20 kept 100% with 128, 92.5% with 512).
    ``recalibrate`` (default on): the plans checked on validation, the plans of compact's calibration search
    and the built model (``finish``) get their batch-norm statistics corrected on the calibration samples
    (``rankcut.recalibration``: forward passes only, no weight changes). Per-layer probes measure truncation
    alone.
    ``reexpansions`` (lossless, default 2): how many times the loss may be re-expanded around the best plan
    so far (one statistics pass and a few probes each); 0 allocates once, from the original model.
    """

    needs_data = True

    def __init__(self, mode: str = "compact", fraction: float | None = None, metric: str = "params", *,
                 calibration_samples: int = CALIBRATION_SAMPLES, batch_size: int = BATCH_SIZE,
                 probe_samples: int | None = None, confidence: float = 2.0,
                 order: str = "spectrum", tolerance: float = NO_CHANGE, max_rounds: int = 3, max_evaluations: int = 10,
                 criterion: str = "loss", recalibrate: bool = True, reexpansions: int = 2,
                 progress: bool = True) -> None:
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
        if probe_samples is None:
            probe_samples = calibration_samples
        if min(calibration_samples, batch_size, probe_samples) < 1:
            raise ValueError("calibration_samples, batch_size and probe_samples must be positive")
        if reexpansions < 0:
            raise ValueError(f"reexpansions must be >= 0, got {reexpansions}")
        if not 0 <= tolerance < math.inf:
            raise ValueError(f"tolerance (the change of the validation loss or metric that compact counts as none, "
                             f"a fraction of the original's) must be finite and >= 0, got {tolerance}")
        if not 0 <= confidence < math.inf:
            raise ValueError(f"confidence (standard errors added to each estimate) must be finite and >= 0, got "
                             f"{confidence}")
        if mode == "compact" and metric != "params":
            raise ValueError(f"compact finds the smallest model in params; metric={metric!r} is lossless's "
                             "(lossless:macs=F keeps a share of the MACs)")
        if mode == "compact" and fraction is not None:
            raise ValueError("compact finds its own size (the smallest with no loss): drop fraction, or use lossless")
        if mode == "lossless" and criterion != "loss":
            raise ValueError("criterion='metric' is compact's (no metric lost); lossless ranks plans by the "
                             "validation metric, then the loss, already")
        if isinstance(fraction, bool):
            raise ValueError(f"fraction is the share of the factorizable {metric} kept, a number; got {fraction}")
        if max_rounds < 0 or max_evaluations < 1:
            raise ValueError(f"max_rounds must be >= 0 and max_evaluations >= 1, got {max_rounds} and "
                             f"{max_evaluations}")
        self.mode, self.fraction, self.metric, self.order = mode, fraction, metric, order
        self.calibration_samples, self.batch_size = calibration_samples, batch_size
        self.probe_samples = min(probe_samples, calibration_samples)
        self.confidence = confidence
        self.tolerance, self.max_rounds, self.max_evaluations = tolerance, max_rounds, max_evaluations
        self.progress, self.criterion, self.recalibrate = progress, criterion, recalibrate
        self.reexpansions = reexpansions
        self.spec = (f"lossless:{metric}={fraction:g}" if mode == "lossless"
                     else "compact" if criterion == "loss" else f"compact:{criterion}")
        self.model: nn.Module | None = None
        self.task: Any = None
        self.summary: dict[str, Any] = {}
        self._target = 0.0  # lossless: the cost the layers the loss depends on may keep
        self._inert: dict[str, Candidate] = {}
        self._inert_plan: dict[str, Option] = {}
        self._energy: dict[str, Option] = {}
        self._validation_seconds = 0.0
        self._reexpansion: dict[str, Any] = {}
        self._search: PathSearch | None = None  # compact: where its search along the path ended
        self._recalibration: BatchNormRecalibration | None = None
        self._search_recalibration: BatchNormRecalibration | None = None

    # -- the steps --------------------------------------------------------------------------------------

    def _bar(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        return tqdm(items, desc=desc, total=total, disable=not self.progress, leave=False)

    def choose(self, candidates: Sequence[Candidate], policy: RankPolicy) -> dict[str, Choice]:
        if self.model is None or self.task is None:
            raise ValueError(f"{self.spec} measures the model's loss: pass a task (task=... or --task) to compress")
        self.summary, self._recalibration, self._search_recalibration = {}, None, None
        if not candidates:  # every layer ignored or unsupported: nothing to measure, the model stays as it is
            return {}
        for candidate in candidates:
            if not candidate.decomposition.supports_components:
                raise ValueError(f"{self.spec}: layer {candidate.name!r} uses {candidate.decomposition.name}; the "
                                 "loss-aware selectors work on the svd and tucker2 decompositions")
            if candidate.rank_limit is not None:
                raise ValueError(f"{self.spec}: layer {candidate.name!r} has a partial randomized SVD; the loss "
                                 "statistics need every component: raise randomized_above (--randomized-above)")
        if self.metric == "macs" and any(c.info.output_positions == 0 for c in candidates):
            raise ValueError(f"{self.spec} needs MACs per layer: {PASS_EXAMPLE_INPUTS}")
        start = time.perf_counter()
        self._validation_seconds = 0.0

        def elapsed() -> float:  # seconds since the start, validation evaluations left out (timed apart)
            return time.perf_counter() - start - self._validation_seconds

        checks: list[dict[str, Any]] = []
        baseline = self._original_on_validation(checks)  # first: a task that cannot judge plans fails at once
        group = Group.current()
        batches = list(self.task.calibration_batches(self.calibration_samples, self.batch_size))
        if not batches:
            raise ValueError(f"{self.spec}: the task gave no calibration batches; the loss statistics are taken on "
                             "them (give LoaderTask a non-empty calibration loader)")
        empty = [index for index, batch in enumerate(batches) if batch_samples(batch) == 0]
        if empty:
            raise ValueError(f"{self.spec}: calibration batches {empty} of {len(batches)} hold no samples (asked for "
                             f"{self.calibration_samples}): ask for fewer calibration samples (calibration_samples=, "
                             "--calibration-samples), or check the task's calibration_batches")
        probe_batches = spread_batches(batches, self.probe_samples)
        if self.recalibrate and batch_norms(self.model):
            self._recalibration = BatchNormRecalibration(self.model, batches, self.task.loss)
            if self.mode == "compact":  # its search measures whole plans, recalibrated on the probe batches
                self._search_recalibration = (
                    self._recalibration if len(probe_batches) == len(batches)  # the default: the same batches
                    else BatchNormRecalibration(self.model, probe_batches, self.task.loss))
        paths = {c.name: self._path(c, policy) for c in candidates if not isinstance(c.basis(), Spectrum)}
        disk = candidates[0].store.disk if candidates else None
        key = (memo.statistics_key(self.model, candidates, batches,
                                   f"{self.probe_samples}/{self.order}/{self.recalibrate}/{sorted(paths.items())}")
               if disk is not None else "")
        # a cache entry is checked against the calibration loss: the probe measures it first
        probe = LossProbe(self.model, probe_batches, self.task.loss, group) if disk is not None else None
        cached = memo.load(disk, key, probe.baseline, paths) if probe is not None else None
        if not group.all_agree(cached is not None):
            cached = None
            stats, calibration_loss = self._statistics(candidates, batches, group, paths)
            measured: dict[str, dict[int, float]] = {}
            probe = probe or self._probe(probe_batches, batches, calibration_loss)
        else:
            stats, measured = cached
        inert = {c.name: c for c in candidates if c.name not in stats}
        self._size_inert_layers(candidates, inert, policy)
        candidates = [c for c in candidates if c.name in stats]
        by_name = {c.name: c for c in candidates}
        tolerance = 1e-3 * abs(probe.baseline)
        curves = {c.name: LayerCurve.of(c, stats[c.name], self.order) for c in candidates}
        for name, table in measured.items():  # an earlier run's measurements: used when the run asks for them
            for removed, change in table.items():  # saved from the curves of a run with the same key
                probe.remember({name: curves[name].kept(removed)}, change)
        statistics_seconds = elapsed()
        if self.mode == "lossless":  # compact checks its sizes on validation; probes where it allocates suffice
            self._probe_initial(curves, probe)
        chosen = self._allocate(curves, policy, probe, tolerance)
        probing_seconds = elapsed() - statistics_seconds
        source, self._reexpansion = LOSS_AWARE, {}
        if self.mode == "lossless" and self.reexpansions:
            chosen, source = self._reexpand(by_name, curves, policy, chosen, probe, tolerance, batches, paths)
        reexpansion_seconds = elapsed() - statistics_seconds - probing_seconds
        verifying = elapsed()
        chosen, source = self._verify(by_name, curves, policy, chosen, source, checks, probe, baseline)
        verified = elapsed()
        self._measure([(curves[name], option.note) for name, option in chosen.items()
                       if option.rank is not None and source == LOSS_AWARE], probe, "measuring the plan")
        kept = self._kept(chosen)
        measured_change = probe.change(by_name, kept) if kept else 0.0  # nothing truncated: exactly no change
        if disk is not None:  # every process: with a cache folder per node, each node keeps its own entry
            memo.save(disk, key, stats, {name: {**measured.get(name, {}), **curve.probes}  # the earlier runs' too
                                         for name, curve in curves.items()}, probe.baseline)
        done = elapsed()
        self.summary = {
            "mode": self.mode, "criterion": self.criterion, "order": self.order, "plan_source": source,
            "batch_norm_recalibration": self._recalibration is not None,
            "calibration_samples": next(iter(stats.values())).a.shape[0],
            "probe_samples": sum(map(batch_samples, probe.batches)), "probe_measurements": probe.measurements,
            "calibration_loss": probe.baseline,
            "statistics_cache": "off" if disk is None else "hit" if cached is not None else "miss",
            "confidence": self.confidence,
            "predicted_loss_change": (self._reexpansion["predicted_loss_change"] if source == REEXPANDED else
                                      None if source == ENERGY else  # its sizes are not on the layers' curves
                                      sum(curves[name].estimate(option.note) for name, option in chosen.items()
                                          if option.rank is not None)),
            "measured_loss_change": measured_change,
            "reexpansion": self._reexpansion,
            "validation_checks": checks,
            "path_search": self._search.summary() if self._search is not None else None,
            "seconds": {"statistics": round(statistics_seconds, 2), "probes_and_allocation": round(probing_seconds, 2),
                        "reexpansion": round(reexpansion_seconds, 2),
                        "validation": round(self._validation_seconds, 2),
                        "search_on_probe_batches": round(verified - verifying, 2),
                        "measuring_the_plan": round(done - verified, 2),
                        "total": round(time.perf_counter() - start, 2)},
        }
        choices = {name: self._choice(curves[name], chosen[name], tolerance, source, policy) for name in by_name}
        for name in inert:
            choices[name] = self._inert_choice(name)
        return choices

    def finish(self, model: nn.Module) -> dict[str, Any] | None:
        """Recalibrate the built model's batch norms as every measured model was; say what was done."""
        if self._recalibration is None:
            return None
        return self._recalibration.finish(model)

    @staticmethod
    def _path(candidate: Candidate, policy: RankPolicy) -> tuple[Rank, ...]:
        """A tucker2 layer's rank pairs from the full one down: its candidate ranks, largest first."""
        full = candidate.decomposition.max_rank(candidate.info)
        return tuple(dict.fromkeys([full, *reversed(policy.candidate_ranks(candidate))]))

    def _statistics(self, candidates: Sequence[Candidate], batches: Sequence[Any], group: Group,
                    paths: Mapping[str, tuple[Rank, ...]]) -> tuple[dict[str, ComponentStats], float]:
        """Every layer's statistics, and the mean loss of the batches; with several processes each takes a share
        of the batches, rows are gathered."""
        mine, losses = group.share(batches), []
        local = gather_statistics(self.model, candidates, mine, self.task.loss,
                                  lambda items: self._bar(items, "loss statistics", len(mine)), paths, losses)
        loss = mean_loss(losses, group)
        if group.world == 1:
            return local, loss
        stats = {}
        for candidate in candidates:
            own, path = local.get(candidate.name), paths.get(candidate.name)
            width = len(path) if path is not None else candidate.basis().max_rank
            rows = own.a if own is not None else torch.empty(0, width, dtype=torch.float64)
            gathered = group.gather_rows(rows)
            if gathered.shape[0]:
                stats[candidate.name] = ComponentStats(candidate.name, gathered, path)
        return stats, loss

    def _probe(self, probe_batches: Sequence[Any], batches: Sequence[Any], calibration_loss: float) -> LossProbe:
        """A probe of the model as it is. When it probes every calibration batch (the default), its baseline is the
        statistics pass's loss on them (see ``LossProbe``), which saves one forward pass over them."""
        every = len(probe_batches) == len(batches)  # spread_batches gives all of them, in order, or fewer
        return LossProbe(self.model, probe_batches, self.task.loss, baseline=calibration_loss if every else None)

    def _size_inert_layers(self, candidates: Sequence[Candidate], inert: Mapping[str, Candidate],
                           policy: RankPolicy) -> None:
        """Size the layers the task's loss does not depend on, and set what the others may keep.

        lossless gives them the ranks of the energy budget plan of every layer, so they take the share the
        ``budget`` selector gives them, and that plan is exactly the alternative ``_verify`` checks. compact
        keeps them dense: the loss says nothing about what they may lose.
        """
        self._inert, self._inert_plan, self._energy = dict(inert), {}, {}
        if self.fraction is None:
            return
        try:
            budget = Budget(self.fraction, self.metric).choose(list(candidates), policy)
        except ValueError as error:
            raise ValueError(f"{self.spec}: {error}") from error
        for candidate in candidates:  # measured as built: tucker2 layers fitted by HOOI, as budget builds them
            rank, why = budget[candidate.name].rank, budget[candidate.name].reason
            fit = Fit(rank) if rank is not None else None
            self._energy[candidate.name] = Option(rank, self._cost(candidate, rank), 0.0, fit, why)
        self._inert_plan = {name: self._energy[name] for name in inert}
        self._target = (self.fraction * sum(self._cost(c, None) for c in candidates)
                        - sum(option.cost for option in self._inert_plan.values()))

    def _inert_choice(self, name: str) -> Choice:
        """The choice for a layer the task's loss does not depend on (see ``_size_inert_layers``)."""
        why = f"{self.spec}: the task's loss does not depend on this layer (e.g. a pooler the task does not use)"
        option = self._inert_plan.get(name)
        if option is None or option.rank is None:
            return Choice(None, f"{why}: kept dense")
        return Choice(option.rank, f"{why}: sized by the energy budget plan of every layer; {option.note}")

    def _probe_initial(self, curves: Mapping[str, LayerCurve], probe: LossProbe) -> None:
        """Measure each layer alone at half and a quarter of its params kept (where those ranks exist)."""
        todo = []
        for curve in curves.values():
            info, decomposition = curve.candidate.info, curve.candidate.decomposition
            for share in (0.5, 0.25):
                fits = [k for k, rank in enumerate(curve.ranks) if decomposition.params(info, rank) <= share
                        * info.dense_params]
                if fits:
                    todo.append((curve, fits[0]))
        self._measure(todo, probe, "probing layers")

    def _measure(self, todo: Sequence[tuple[LayerCurve, int]], probe: LossProbe, desc: str) -> None:
        for curve, removed in self._bar(todo, desc):
            if removed not in curve.probes:
                name = curve.candidate.name
                curve.probes[removed] = probe.change({name: curve.candidate}, {name: curve.kept(removed)})

    def _options(self, curve: LayerCurve, policy: RankPolicy) -> list[Option]:
        """Dense, plus every (rounded) rank that pays off, with the loss change it is charged (upper bound)."""
        options = [Option(None, self._cost(curve.candidate, None), curve.upper_bound(0, self.confidence), note=0)]
        for rank in policy.candidate_ranks(curve.candidate):
            removed = curve.removed_for(rank)
            if removed is not None and policy.pays_off(curve.candidate, rank):
                options.append(Option(rank, self._cost(curve.candidate, rank),
                                      curve.upper_bound(removed, self.confidence),
                                      curve.kept(removed), removed))
        return options

    def _cost(self, candidate: Candidate, rank: int | None) -> int:
        return layer_cost(candidate, rank, self.metric)

    def _select(self, options: Mapping[str, list[Option]], curves: Mapping[str, LayerCurve],
                probe: LossProbe) -> dict[str, Option]:
        """The plan the estimates favour: within the budget (lossless) or at no predicted loss (compact)."""
        if self.mode == "lossless":
            total = sum(opts[0].cost for opts in options.values())
            cheapest = sum(min(o.cost for o in opts) for opts in options.values())
            if cheapest > self._target:
                raise ValueError(f"{self.spec} cannot be met: even the smallest ranks that pay off keep "
                                 f"{cheapest / total:.1%} of the factorizable {self.metric} the loss depends on")
            return walk_to_budget(options, self._target)
        path = self._compact_path(options, curves, probe)
        return plan_after(path.start, path.steps, path.guess)

    def _compact_path(self, options: Mapping[str, list[Option]], curves: Mapping[str, LayerCurve],
                      probe: LossProbe) -> CompactPath:
        """compact's path, how many of its steps are the free cuts, and where its summed estimates turn positive
        (the search's first guess).

        First the cuts predicted to change nothing: |estimate| plus ``confidence`` standard errors within the
        tolerance (a compressible model's spectrum tails, components at float rounding level). Then, from there,
        the greedy path by least loss added per unit saved, where cuts with a significant predicted gain go
        first. Those gains are real changes that validation may refuse, and a path that began with them would
        end at its first step without ever taking the cuts that change nothing.
        """
        threshold = self.tolerance * abs(probe.baseline)
        negligible = {name: [option for option in opts if option.rank is None or curves[name].negligible(
                          option.note, self.confidence, threshold)] for name, opts in options.items()}
        start, free = greedy_path(negligible)
        reached = plan_after(start, free, len(free))
        rest = {name: [option for option in opts if option.cost <= reached[name].cost]
                for name, opts in options.items()}
        middle, steps = greedy_path(rest)  # every layer's dearest option is where the free cuts left it
        return CompactPath(start, free + steps, len(free), len(free) + feasible_position(middle, steps))

    def _allocate(self, curves: Mapping[str, LayerCurve], policy: RankPolicy, probe: LossProbe,
                  tolerance: float) -> dict[str, Option]:
        """Allocate, measure chosen sizes outside their layer's trusted range, and allocate again.

        After ``max_rounds`` the last allocation chooses only among sizes measured or trusted (the sizes just
        measured are among them, so it can always be met): a size is never chosen on an untrusted estimate.
        """
        for _ in range(self.max_rounds):
            options = {name: self._options(curve, policy) for name, curve in curves.items()}
            chosen = self._select(options, curves, probe)
            unknown = [(curves[name], option.note) for name, option in chosen.items()
                       if not curves[name].known(option.note, tolerance)]
            if not unknown:
                return chosen
            self._measure(unknown, probe, "measuring chosen ranks")
        return self._select({name: [option for option in self._options(curve, policy)
                                    if curve.known(option.note, tolerance)] for name, curve in curves.items()},
                            curves, probe)

    def _reexpand(self, candidates: Mapping[str, Candidate], curves: Mapping[str, LayerCurve], policy: RankPolicy,
                  chosen: dict[str, Option], probe: LossProbe, tolerance: float, batches: Sequence[Any],
                  paths: Mapping[str, tuple[Rank, ...]]) -> tuple[dict[str, Option], str]:
        """lossless: re-expand the loss around the better, measured whole on the probe batches, of its plan and
        the energy budget plan, and allocate the budget again from there; repeat while the measured loss falls.

        The Taylor terms and per-layer probes of the original model add up only for small cuts: at deep
        budgets cuts that are cheap one at a time can be dear together. Around a plan of the target size the
        moves are small again, and statistics and probes taken with the model at that plan see how the layers
        interact. Returns the plan to validate (its own, unless a re-expansion lowered the measured loss).
        """
        plans = {LOSS_AWARE: chosen, ENERGY: {name: self._energy[name] for name in candidates}}
        measured = {label: self._plan_change(candidates, plan, probe, self._recalibration)
                    for label, plan in plans.items()}
        label = min(measured, key=measured.__getitem__)
        centre, best = plans[label], measured[label]
        record: dict[str, Any] = {"centre": label, "probe_loss_change": {k: round(v, 6) for k, v in measured.items()},
                                  "steps": []}
        found = None
        for _ in range(self.reexpansions):
            origins = {name: 0 if option.rank is None else curves[name].removed_for(option.rank)
                       for name, option in centre.items()}
            if any(origin is None for origin in origins.values()):  # a rank off the layer's curve
                break
            kept = {name: curves[name].kept(origin) for name, origin in origins.items() if origin}
            with substituted(candidates, kept), self._recalibrated(self._recalibration, kept):
                stats, calibration_loss = self._statistics(list(candidates.values()), batches, Group.current(), paths)
                if set(stats) != set(candidates):
                    break
                local = self._probe(probe.batches, batches, calibration_loss)
                around = {name: curves[name].around(stats[name], origins[name]) for name in candidates}
                plan = self._allocate(around, policy, local, tolerance)
            change = self._plan_change(candidates, plan, probe, self._recalibration)
            predicted = best + sum(around[name].estimate(option.note) for name, option in plan.items())
            record["steps"].append({"probe_loss_change": round(change, 6), "predicted": round(predicted, 6),
                                    "probes": local.measurements,
                                    "layers_moved": sum(option.note != origins[name] for name, option in plan.items())})
            if not change < best:
                break
            centre, best, found = plan, change, predicted
        if found is None:
            self._reexpansion = record
            return chosen, LOSS_AWARE
        self._reexpansion = {**record, "predicted_loss_change": found}
        return centre, REEXPANDED

    def _plan_change(self, candidates: Mapping[str, Candidate], plan: Mapping[str, Option], probe: LossProbe,
                     recalibration: BatchNormRecalibration | None) -> float:
        """A whole plan's loss change on the probe batches, measured as it is built (batch norms recalibrated);
        nan or inf when the plan breaks the model's numerics."""
        kept = self._kept(plan)
        within = None if recalibration is None else self._recalibrated(recalibration, kept)
        return probe.change(candidates, kept, strict=False, within=within)

    def _verify(self, candidates: Mapping[str, Candidate], curves: Mapping[str, LayerCurve], policy: RankPolicy,
                chosen: dict[str, Option], source: str, checks: list[dict[str, Any]],
                probe: LossProbe, baseline: Mapping[str, float]) -> tuple[dict[str, Option], str]:
        """Check plans with the task's real evaluation on the validation split; return the kept one and its source.

        lossless: the better (metric, then loss) of this plan and the energy-based budget plan of the same size.
        compact: a search along its path (``_compact_path``). Its first step is checked first, on the probe
        batches then on validation; a model that fails it keeps everything. Otherwise the probe batches' loss
        (forward passes on the calibration samples) finds the longest prefix that does not raise it, then
        validation, from there, the longest prefix with no ``_refusal`` (never longer than the calibration
        bracket, unless ``criterion="metric"``). No position is measured twice. ``baseline`` holds the
        original model's validation results (``_original_on_validation``).
        """
        self._search = None
        if self.mode == "lossless":
            alternative = {name: self._energy[name] for name in candidates}  # the budget plan, these layers
            ours = self._validate(candidates, chosen, source, checks)
            theirs = self._validate(candidates, alternative, ENERGY, checks)
            if _not_finite(ours) and _not_finite(theirs):
                raise ValueError(f"{self.spec}: on validation, the {source} plan's {_not_finite(ours)} and the "
                                 f"{ENERGY} plan's {_not_finite(theirs)}; this size breaks the model's numerics "
                                 "(keep more)")
            return (chosen, source) if self._score(ours) >= self._score(theirs) else (alternative, ENERGY)
        options = {name: self._options(curve, policy) for name, curve in curves.items()}
        path = self._compact_path(options, curves, probe)
        start, steps = path.start, path.steps
        refusals: dict[int, str] = {}  # position -> why the first check that refused it did

        @functools.cache
        def calibration_passes(position: int) -> bool:
            change = self._plan_change(candidates, plan_after(start, steps, position), probe,
                                       self._search_recalibration)
            allowed = self.tolerance * abs(probe.baseline)
            passed = change <= allowed  # False for nan and inf
            if not passed:
                refusals.setdefault(position, f"the calibration samples' loss changed by {change:+.2g} (tolerance "
                                              f"{allowed:.2g})")
            return passed

        @functools.cache
        def validation_passes(position: int) -> bool:
            metrics = self._validate(candidates, plan_after(start, steps, position),
                                     f"path step {position}/{len(steps)}", checks)
            why = self._refusal(metrics, baseline)
            if why is not None:
                refusals.setdefault(position, why)
            return why is None

        def ended(accepted: int, refused: int) -> tuple[dict[str, Option], str]:
            self._search = PathSearch(path, accepted, refused if refused <= len(steps) else None,
                                      refusals.get(refused, "not checked: the validation checks ran out"))
            return plan_after(start, steps, accepted), LOSS_AWARE

        # a model that cannot afford the path's first step, on calibration then on validation, has nothing to
        # give: no search (a longer step that passed after a failing first one would most likely pass on noise)
        if not steps or not calibration_passes(1) or not validation_passes(1):
            return ended(0, 1)
        # cheap forward passes on the probe batches bracket the search; validation confirms (and corrects)
        first = max(1, path.guess)
        found, refused = last_passing(calibration_passes, first, 0, len(steps) + 1, len(steps) + 1)
        if self.criterion == "loss":  # validation confirms the calibration bracket, or searches below it
            return ended(*last_passing(validation_passes, found, 0, refused, self.max_evaluations))
        # a higher loss may still keep the metric: search the whole path, from the best guess
        return ended(*last_passing(validation_passes, found or first, 0, len(steps) + 1, self.max_evaluations))

    def _original_on_validation(self, checks: list[dict[str, Any]]) -> dict[str, float]:
        """The original model's validation results, which every plan is judged against; refused when they lack
        the task's metric or are not finite."""
        baseline = self._validate({}, {}, "original", checks)
        if self.task.metric_name not in baseline:
            raise ValueError(f"{self.spec}: the task's evaluate(model, 'validation') returned {sorted(baseline)}, "
                             f"without its metric_name {self.task.metric_name!r}; every plan is judged on it")
        broken = _not_finite(baseline)
        if broken:
            raise ValueError(f"{self.spec}: the original model's validation {broken}; every plan is compared with "
                             "it: check the validation data and the task's evaluation")
        return baseline

    @staticmethod
    def _kept(plan: Mapping[str, Option]) -> dict[str, Any]:
        """The kept components of every factorized layer of a plan."""
        return {name: option.components for name, option in plan.items() if option.rank is not None}

    def _validate(self, candidates: Mapping[str, Candidate], plan: Mapping[str, Option], label: str,
                  checks: list[dict[str, Any]]) -> dict[str, float]:
        begin = time.perf_counter()
        plan = {**self._inert_plan, **plan} if plan else {}  # the model the plan builds, inert layers included
        kept = self._kept(plan)
        with substituted({**candidates, **self._inert}, kept), self._recalibrated(self._recalibration, kept):
            metrics = Group.current().broadcast_metrics(self.task.evaluate(self.model, "validation"))
        self._validation_seconds += time.perf_counter() - begin
        total = sum(option.cost for option in plan.values()) if plan else None
        checks.append({"plan": label, "validation": metrics, "cost": total})
        return metrics

    def _recalibrated(self, recalibration: BatchNormRecalibration | None,
                      kept: Mapping[str, Any]) -> AbstractContextManager[Any]:
        """The batch-norm recalibration a truncated model is measured with (none when nothing is truncated:
        the paired shift is then exactly zero). ``kept`` must be all that is truncated: it keys the estimate,
        so a plan measured on the probe batches and then on validation is estimated once."""
        if recalibration is None or not kept:
            return nullcontext()
        return recalibration.applied(self.model, truncation_key(kept))

    def _score(self, metrics: Mapping[str, float]) -> tuple[float, float]:
        """lossless's ranking of validation results: the metric, then the loss; a non-finite result is last."""
        if _not_finite(metrics):
            return -float("inf"), -float("inf")
        return metrics.get(self.task.metric_name, 0.0), -metrics.get("loss", 0.0)

    def _refusal(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str | None:
        """Why validation ``metrics`` are a loss (the first criterion missed), or None when they pass.

        No loss: the validation metric not below the original's and, unless ``criterion="metric"``, the
        validation loss not above it; a change within ``tolerance`` of the original value counts as none (on
        accuracy over fewer than 100,000 examples that is less than one example: the check stays exact)."""
        broken = _not_finite(metrics)
        if broken:
            return f"validation {broken}"
        slack = {key: self.tolerance * abs(value) for key, value in baseline.items()}
        if "loss" in baseline and self.criterion == "loss" and metrics["loss"] > baseline["loss"] + slack["loss"]:
            return f"validation loss {metrics['loss']:.6g} above the original's {baseline['loss']:.6g}"
        name = self.task.metric_name
        if name != "loss" and metrics[name] < baseline[name] - slack[name]:
            return f"validation {name} {metrics[name]:.6g} below the original's {baseline[name]:.6g}"
        return None

    def _choice(self, curve: LayerCurve, option: Option, tolerance: float, source: str,
                policy: RankPolicy) -> Choice:
        if option.rank is None:
            return Choice(None, f"{self.spec}: kept dense ({self._why_dense(curve, source, policy)})"
                                f"{policy.guard_note(curve.candidate)}")
        components = curve.candidate.decomposition.plan_components(option.rank, option.components)
        if source == ENERGY:  # the energy budget plan won the validation check
            return Choice(option.rank, f"{self.spec}: energy budget plan, better on validation; {option.note}",
                          components)
        removed = option.note
        why = f"{self.spec}: {self._cut(curve, option)}; "
        if source == REEXPANDED:
            record = self._reexpansion
            why += (f"allocated with the loss re-expanded around the {record['centre']} plan (whole plan on the probe "
                    f"batches: ΔL {record['probe_loss_change'][record['centre']]:+.4f} → "
                    f"{min(step['probe_loss_change'] for step in record['steps']):+.4f}); this layer alone: ")
        why += f"ΔL predicted {float(curve.predicted[removed]):+.4f} (Taylor), {self._estimated(curve, removed)}"
        measured = curve.probes.get(removed)
        if measured is not None:
            why += f", measured {measured:+.4f} (layer alone)"
        why += f"; Taylor trusted up to {curve.trusted(tolerance)[1]} removed"
        return Choice(option.rank, why, components)

    @staticmethod
    def _cut(curve: LayerCurve, option: Option) -> str:
        """What a layer's option keeps, in words: components dropped (svd) or channel ranks kept (tucker2)."""
        if isinstance(option.rank, int):
            components = curve.candidate.decomposition.plan_components(option.rank, option.components)
            subset = "" if components is None else " (not only the smallest)"
            return f"drop {option.note} of {curve.size} components{subset}"
        return (f"keep {option.rank[0]}x{option.rank[1]} of {curve.ranks[0][0]}x{curve.ranks[0][1]} channel "
                "components (projection on the leading ones, no HOOI)")

    @staticmethod
    def _estimated(curve: LayerCurve, removed: int) -> str:
        return f"estimated {curve.estimate(removed):+.4f} ± {float(curve.standard_error[removed]):.4f}"

    def _charged(self, curve: LayerCurve, option: Option) -> str:
        """A cut, its loss change and what it is charged when layers compete (``confidence`` errors above)."""
        return (f"{self._cut(curve, option)}, ΔL {self._estimated(curve, option.note)}, charged "
                f"{option.error:+.4f}")

    def _why_dense(self, curve: LayerCurve, source: str, policy: RankPolicy) -> str:
        """Why a layer was kept dense: no rank pays off, or where its first cut stood against the others'."""
        if source == ENERGY:
            return "so does the energy budget plan, better on validation"
        options = self._options(curve, policy)
        if len(options) == 1:
            return "no rank of this layer pays off"
        if self.mode == "compact":  # where the layer's first cut lies on the path, and where the checks stopped
            position = self._search.first_step(curve.candidate.name) if self._search is not None else None
            if position is None:
                return "none of its cuts is on the path"
            _, cut = self._search.path.steps[position - 1]
            return (f"its first cut ({self._charged(curve, cut)}) is step {position} of "
                    f"{len(self._search.path.steps)} on the path; the checks stopped at step {self._search.accepted}")
        best = lower_hull(options)[1]  # the cut with the least loss added per unit saved
        origin = " on the original model" if source == REEXPANDED else ""
        unit, units = ("parameter", "params") if self.metric == "params" else ("MAC", "MACs")
        return (f"the budget went to cuts that add less loss per {unit} saved; its best ({self._charged(curve, best)}"
                f"{origin}) saves {options[0].cost - best.cost:,} {units}")


def _not_finite(metrics: Mapping[str, float]) -> str | None:
    """The first non-finite validation result, in words (``loss is nan``), or None when all are finite."""
    return next((f"{key} is {value}" for key, value in metrics.items() if not math.isfinite(value)), None)
