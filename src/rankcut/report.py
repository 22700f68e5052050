"""Before/after numbers of a compression: params, MACs, metric, time, and the plan behind them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankcut.plan import Plan, format_table


@dataclass
class Report:
    """What a compression did. Ratios are always "kept" (after / before); "removed" is 1 − kept."""

    plan: Plan
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    inputs: str = ""
    metric_name: str | None = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    other_modules: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def factorizable_params(self) -> tuple[int, int]:
        """Params of the layers rankcut could factorize, before and after."""
        layers = [layer for layer in self.plan.layers if layer.supported]
        return sum(x.params_before for x in layers), sum(x.params_after for x in layers)

    def to_dict(self) -> dict[str, Any]:
        metric = None
        if self.metric_name is not None:
            metric = {"name": self.metric_name, "before": self.metrics_before.get(self.metric_name),
                      "after": self.metrics_after.get(self.metric_name),
                      "all_before": self.metrics_before, "all_after": self.metrics_after}
        factorizable_before, factorizable_after = self.factorizable_params
        return {
            "params": {"before": self.params_before, "after": self.params_after,
                       "kept": _ratio(self.params_after, self.params_before),
                       "factorizable_before": factorizable_before, "factorizable_after": factorizable_after},
            "macs": {"before": self.macs_before, "after": self.macs_after,
                     "kept": _ratio(self.macs_after, self.macs_before), "inputs": self.inputs},
            "metric": metric,
            "seconds": round(self.seconds, 3),
            "selector": self.plan.selector,
            "selection": self.plan.meta.get("selection"),
            "bases": self.plan.meta.get("bases"),
            "after_factorization": self.plan.meta.get("after_factorization"),
            "processes": self.plan.meta.get("processes", 1),
            "layers": [layer.to_dict() for layer in self.plan.layers],
            "unsupported_modules": [{"name": n, "type": t, "params": p} for n, t, p in self.other_modules],
        }

    def summary(self) -> str:
        """A short before/after table for people."""
        rows = [("", "before", "after", "kept", "removed")]
        rows.append(_row("params (whole model)", self.params_before, self.params_after))
        before, after = self.factorizable_params
        rows.append(_row("params (factorizable layers)", before, after))
        if self.macs_before is not None:
            rows.append(_row(f"MACs ({self.inputs})" if self.inputs else "MACs", self.macs_before, self.macs_after))
        for name in self.metrics_before:
            b, a = self.metrics_before[name], self.metrics_after.get(name)
            rows.append((name, f"{b:.4f}", "-" if a is None else f"{a:.4f}", "", ""))
        factorized = len(self.plan.factorized())
        text = format_table(rows)
        layers = len(self.plan.layers)
        text += f"\n{factorized} of {layers} layers factorized ({self.plan.selector}) in {self.seconds:.1f} s"
        selection = self.plan.meta.get("selection")
        if selection:
            text += "\n" + describe_selection(selection)
        finished = self.plan.meta.get("after_factorization")
        if finished and "batch_norms" in finished:
            text += (f"\nbatch-norm statistics of {finished['batch_norms']} layers recalibrated on "
                     f"{finished['calibration_samples']} calibration samples (no weights trained)")
        if self.other_modules:
            text += "\n" + describe_other_modules(self.other_modules)
        return text


def describe_selection(selection: dict) -> str:
    """What a loss-aware selector measured: calibration loss change predicted vs measured, validation checks."""
    lines = [f"loss-aware selection ({selection['mode']}, plan from {selection['plan_source']}): "
             f"{selection['calibration_samples']} calibration samples, {selection['probe_measurements']} probe "
             f"passes, each cut charged {selection.get('confidence', 0):g} standard errors above its estimate, "
             f"{selection['seconds']['total']:.1f} s",
             f"calibration loss {selection['calibration_loss']:.4f}: change {_predicted(selection)}, "
             f"measured {selection['measured_loss_change']:+.4f}{_measured_how(selection)}"]
    reexpansion = selection.get("reexpansion")
    if reexpansion:
        before = reexpansion["probe_loss_change"]
        steps = "; ".join(f"{step['probe_loss_change']:+.4f} ({step['layers_moved']} layers moved, "
                          f"{step['probes']} probes)" for step in reexpansion["steps"]) or "none"
        lines.append(f"whole plans on the probe batches: loss-aware {before['loss-aware']:+.4f}, energy budget "
                     f"{before['energy budget']:+.4f}; re-expanded around the {reexpansion['centre']} plan: {steps}")
    for check in selection["validation_checks"]:
        values = ", ".join(f"{k}={v:.4f}" for k, v in check["validation"].items())
        lines.append(f"  validation, {check['plan']}: {values}")
    search = selection.get("path_search")
    if search:
        ended = ("the whole path passed" if search["refused"] is None
                 else f"step {search['refused']} refused: {search['why']}")
        lines.append(f"compact's path: {search['steps']} steps, the first {search['free_steps']} predicted to change "
                     f"nothing; {search['accepted']} accepted, {ended}")
    return "\n".join(lines)


def _predicted(selection: dict) -> str:
    """The plan's predicted calibration loss change and how it was added up (none for the energy budget plan,
    whose sizes the Taylor curves were not asked about)."""
    if selection["predicted_loss_change"] is None:
        return "not predicted (the energy budget plan was kept)"
    how = ("the re-expansion centre's measured change plus the layers' changes from it"
           if selection["plan_source"] == "re-expanded" else "sum over layers")
    return f"predicted {selection['predicted_loss_change']:+.4f} ({how})"


def _measured_how(selection: dict) -> str:
    """The summary's measured change is the plan's truncation alone, like the Taylor sum it sits next to; with
    batch norms the model is built recalibrated, as the whole-plan lines below measure it."""
    return " (truncation alone, batch norms not recalibrated)" if selection.get("batch_norm_recalibration") else ""


def describe_other_modules(other_modules: list[tuple[str, str, int]]) -> str:
    """One line naming the module types rankcut left alone, with their parameter counts."""
    kinds: dict[str, tuple[int, int]] = {}
    for _name, kind, params in other_modules:
        count, total = kinds.get(kind, (0, 0))
        kinds[kind] = (count + 1, total + params)
    listed = ", ".join(f"{count} {kind} ({total:,} params)" for kind, (count, total) in sorted(kinds.items()))
    return f"left alone (type not supported): {listed}"


def _ratio(after: int | None, before: int | None) -> float | None:
    return None if not before or after is None else round(after / before, 6)


def _row(label: str, before: int | None, after: int | None) -> tuple[str, ...]:
    if not before or after is None:
        return (label, f"{before or 0:,}", "-", "-", "-")
    kept = after / before
    return (label, f"{before:,}", f"{after:,}", f"{kept:.1%}", f"{1 - kept:.1%}")
