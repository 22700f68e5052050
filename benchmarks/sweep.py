"""Sweep parameter budgets for one reference model: every method at every budget, one JSON of results.

    python benchmarks/sweep.py resnet20 --budgets 0.8,0.6,0.4 --out benchmarks/results/resnet20.json

"Budget" is the share of the factorizable layers' params KEPT. Metrics are on the test split; calibration
(ASVD's activation statistics) uses the calibration split only. Latency: median over repeated runs in this
process, original measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from baselines import asvd, tltorch_tucker
from torch import nn

import rankcut
from rankcut.counting import count_macs, count_params
from rankcut.inventory import Inventory, scan
from rankcut.joint import LossAware
from rankcut.latency import compare_latency
from rankcut.selectors import EVBMF, Energy, Selector
from rankcut.sources import ZOO


def factorizable_kept(model: nn.Module, original_factorizable: int, factorizable_names: set[str]) -> float:
    """Share of the original factorizable params still held by those layers (or their replacements)."""
    kept = sum(p.numel() for name, module in model.named_modules() if name in factorizable_names
               for p in module.parameters())
    return kept / original_factorizable


def matched(make: Callable[[float], Selector], model: nn.Module, inventory: Inventory, fraction: float,
            decomposition: str) -> tuple[Selector, float]:
    """The selector setting (by bisection on its knob in [0, 1]) whose plan keeps at most ``fraction`` of params."""
    total = sum(c.info.dense_params for c in inventory.factorizable())

    def kept(knob: float) -> float:
        plan = rankcut.make_plan(model, make(knob), inventory=inventory, decomposition=decomposition)
        return sum(layer.params_after for layer in plan.layers if layer.supported) / total

    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if kept(middle) <= fraction:
            low = middle
        else:
            high = middle
    return make(low), low


def method_builders(original: nn.Module, task, inventory: Inventory,
                    probe_samples: int | None) -> dict[str, Callable[[float | None], tuple[nn.Module, str]]]:
    """Every method of the sweep by name: a function of the budget (None for compact) giving the compressed
    model and the setting it ran with."""
    inputs = task.example_inputs()
    names = {c.name for c in inventory.factorizable()}

    def budget(f: float, note: str = "", **options) -> tuple[nn.Module, str]:
        """The ``budget`` selector at ``f`` with compress options (decomposition, recalibration, ...)."""
        compressed = rankcut.compress(original, f"budget:params={f}", progress=False, **options)[0]
        return compressed, f"budget:params={f}{note}"

    def loss_aware(mode: str, f: float | None, decomposition: str = "svd", **options) -> tuple[nn.Module, str]:
        """lossless (with the sweep's --probe-samples) or compact (at its defaults) on ``decomposition``."""
        if mode == "lossless":
            options["probe_samples"] = probe_samples
        return _loss_aware(original, task, LossAware(mode, f, progress=False, **options), decomposition)

    recalibrated = ", batch norms recalibrated as lossless does (ablation)"
    return {
        "uniform-svd": lambda f: (rankcut.compress(original, f"fixed:{f}", progress=False)[0], f"fixed:{f}"),
        "energy": lambda f: _selector(original, inventory, lambda k: Energy(max(k, 1e-6)), f, "energy"),
        "evbmf": lambda f: _selector(original, inventory, lambda k: EVBMF(weakening=1 - k), f, "evbmf"),
        "budget": lambda f: budget(f),
        "budget-r8": lambda f: budget(f, ", ranks rounded to multiples of 8", round_to=8),
        "budget-guard": lambda f: budget(f, ", latency guard at the example input's shape", example_inputs=inputs,
                                         latency_guard=True),
        "asvd": lambda f: (asvd(original, task, f), f"fixed:{f} on W·diag(mean|x|^0.5)"),
        "tltorch-tucker": lambda f: tltorch_tucker(original, f, names),
        "budget-bn": lambda f: budget(f, recalibrated, task=task, recalibrate=True),
        "budget-tucker2-bn": lambda f: budget(f, ", decomposition auto" + recalibrated, decomposition="auto",
                                              task=task, recalibrate=True),
        "lossless": lambda f: loss_aware("lossless", f),
        "budget-tucker2": lambda f: budget(f, ", decomposition auto (Tucker-2 for k×k convs)", decomposition="auto"),
        "lossless-tucker2": lambda f: loss_aware("lossless", f, "auto"),
        "budget-whitened": lambda f: budget(f, ", decomposition whitened-svd", task=task,
                                            decomposition="whitened-svd"),
        "budget-whitened-bn": lambda f: budget(f, ", decomposition whitened-svd, batch norms recalibrated", task=task,
                                               decomposition="whitened-svd", recalibrate=True),
        "lossless-whitened": lambda f: loss_aware("lossless", f, "whitened-svd"),
        "compact-whitened": lambda f: loss_aware("compact", None, "whitened-svd"),
        "compact": lambda f: loss_aware("compact", None),
        "compact-metric": lambda f: loss_aware("compact", None, criterion="metric"),
    }


def run(model_name: str, budgets: list[float], methods: list[str], repeats: int, batches: tuple[int, ...],
        probe_samples: int | None) -> dict:
    task = ZOO[model_name].task()
    original = task.build_model()
    inputs = task.example_inputs()
    decomposition = "svd"
    inventory = scan(original, inputs, decomposition)
    names = {c.name for c in inventory.factorizable()}
    original_factorizable = sum(c.info.dense_params for c in inventory.factorizable())
    start = time.perf_counter()
    base_metrics = task.evaluate(original, "test")
    eval_seconds = time.perf_counter() - start
    results = {
        "model": model_name, "task": task.name, "metric": task.metric_name, "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "original": {"params": count_params(original), "factorizable_params": original_factorizable,
                     "macs": count_macs(original, inputs), "metrics": base_metrics, "eval_seconds": eval_seconds},
        "rows": [],
    }
    print(f"{model_name}: original {task.metric_name}={base_metrics[task.metric_name]:.4f}", flush=True)
    builders = method_builders(original, task, inventory, probe_samples)
    sizeless = [m for m in methods if m in SIZELESS]  # they choose their own size: one run each
    runs = [(f, m) for f in budgets for m in methods if m not in SIZELESS] + [(None, m) for m in sizeless]
    for fraction, method in runs:
        start = time.perf_counter()
        compressed, setting = builders[method](fraction)
        seconds = time.perf_counter() - start
        metrics = task.evaluate(compressed, "test")
        latency = compare_latency({"original": original, "compressed": compressed}, inputs, batches, repeats)
        row = {
            "method": method, "budget": fraction, "setting": setting,
            "factorizable_kept": factorizable_kept(compressed, original_factorizable, names),
            "params_kept": count_params(compressed) / results["original"]["params"],
            "macs_kept": count_macs(compressed, inputs) / results["original"]["macs"],
            "metrics": metrics, "compress_seconds": seconds,
            "latency_ms": {str(b): {k: v * 1e3 for k, v in t.items()} for b, t in latency.items()},
        }
        if fraction is None:  # compact chooses its own size
            row["budget"] = row["factorizable_kept"]
        results["rows"].append(row)
        print(f"  {method:15s} budget {row['budget']:.2f}: kept {row['factorizable_kept']:.3f} "
              f"{task.metric_name}={metrics[task.metric_name]:.4f} ({seconds:.1f} s)", flush=True)
    return results


def _loss_aware(model: nn.Module, task, selector: LossAware, decomposition: str = "svd") -> tuple[nn.Module, str]:
    compressed, report = rankcut.compress(model, selector, task=task, decomposition=decomposition, progress=False)
    selection = report.plan.meta["selection"]
    return compressed, (f"{selector.spec}, decomposition {decomposition}, "
                        f"{selection['calibration_samples']} calibration samples, "
                        f"{selection['probe_measurements']} probes, "
                        f"{len(selection['validation_checks'])} validation checks, plan: {selection['plan_source']}")


def _selector(model, inventory, make, fraction, label) -> tuple[nn.Module, str]:
    selector, knob = matched(make, model, inventory, fraction, "svd")
    compressed, _ = rankcut.compress(model, selector, progress=False)
    return compressed, f"{label} knob {knob:.4f} (matched to budget)"


METHODS = ["uniform-svd", "asvd", "tltorch-tucker", "energy", "evbmf", "budget", "budget-r8", "budget-guard",
           "budget-bn", "budget-tucker2", "budget-tucker2-bn", "budget-whitened", "budget-whitened-bn", "lossless",
           "lossless-tucker2", "lossless-whitened", "compact", "compact-metric", "compact-whitened"]
# the same as their svd / no-batch-norm rows on a transformer
CONV_ONLY = ("tltorch-tucker", "budget-bn", "budget-tucker2", "budget-tucker2-bn", "budget-whitened-bn",
             "lossless-tucker2")
SIZELESS = ("compact", "compact-metric", "compact-whitened")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(ZOO))
    parser.add_argument("--budgets", default="0.9,0.7,0.5,0.3", help="shares of factorizable params kept")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--probe-samples", type=int, help="lossless rows: calibration samples per probe (default: "
                        "all 512, as make bench runs them). compact rows always probe on all of them")
    parser.add_argument("--append", action="store_true", help="merge into --out, replacing rows of these methods")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = args.methods.split(",")
    if args.model == "minilm":  # Tucker-2 applies to convs; MiniLM has none
        methods = [m for m in methods if m not in CONV_ONLY]
    results = run(args.model, [float(b) for b in args.budgets.split(",")], methods, args.repeats,
                  tuple(int(b) for b in args.batches.split(",")), args.probe_samples)
    if args.append and args.out.is_file():
        previous = json.loads(args.out.read_text())
        results["rows"] = [r for r in previous["rows"] if r["method"] not in methods] + results["rows"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
