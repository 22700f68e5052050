"""What does loss-aware selection cost? ``compact`` wall time against the floor of any data-checked method.

    python benchmarks/cost.py resnet56 minilm --out results/cost.json

The floor is one SVD of every factorizable layer plus one evaluation pass over the validation split. That is
what a method that reads the spectra and checks its result once cannot avoid. The same evaluation took
6.3 s or 9.3 s in one process, an hour apart in the same session, so compact (``--repeats`` runs, default 3)
and the evaluation (one more than that) are timed in turn, and the medians are kept, with their ranges.
The table gives compact's time, split into its steps (those of its median run), and its ratio to the
floor. Same process, 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, write_rows

import rankcut
from rankcut.inventory import scan
from rankcut.joint import LossAware
from rankcut.plan import Plan
from rankcut.sources import ZOO


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _timed_compact(model: torch.nn.Module, task: Any, probe_samples: int | None) -> tuple[float, LossAware, Plan]:
    selector = LossAware("compact", probe_samples=probe_samples, progress=False)
    start = time.perf_counter()
    plan = rankcut.make_plan(model, selector, task=task)
    return time.perf_counter() - start, selector, plan


def measure(model_name: str, probe_samples: int | None, repeats: int) -> dict:
    task = ZOO[model_name].task()
    model = task.build_model()
    start = time.perf_counter()
    for candidate in scan(model, decomposition="svd").factorizable():
        candidate.basis()
    svd_seconds = time.perf_counter() - start
    evaluations, runs = [], []
    for _ in range(repeats):  # interleaved, so that the machine's drift reaches both alike
        evaluations.append(_seconds(lambda: task.evaluate(model, "validation")))
        runs.append(_timed_compact(model, task, probe_samples))
    evaluations.append(_seconds(lambda: task.evaluate(model, "validation")))
    eval_seconds = statistics.median(evaluations)
    runs.sort(key=lambda run: run[0])
    compact_seconds, selector, plan = runs[len(runs) // 2]
    summary = plan.meta["selection"]
    supported = [layer for layer in plan.layers if layer.supported]
    kept = sum(layer.params_after for layer in supported) / sum(layer.params_before for layer in supported)
    floor = svd_seconds + eval_seconds
    row = {"model": model_name, "svd_s": svd_seconds, "eval_s": eval_seconds, "floor_s": floor,
           "compact_s": compact_seconds, "ratio": compact_seconds / floor, "probe_samples": selector.probe_samples,
           "statistics_s": summary["seconds"]["statistics"],
           "probes_s": summary["seconds"]["probes_and_allocation"],
           "validation_s": summary["seconds"]["validation"],
           "search_s": summary["seconds"]["search_on_probe_batches"],
           "measuring_s": summary["seconds"]["measuring_the_plan"],
           "validation_checks": len(summary["validation_checks"]), "probe_measurements": summary["probe_measurements"],
           "factorizable_kept": kept, "repeats": repeats,
           "eval_range_s": [min(evaluations), max(evaluations)], "compact_range_s": [runs[0][0], runs[-1][0]]}
    print(f"{model_name}: floor {floor:.1f} s (SVDs {svd_seconds:.1f} + eval {eval_seconds:.1f}), compact "
          f"{compact_seconds:.1f} s = {row['ratio']:.1f}x floor, kept {kept:.1%}", flush=True)
    return row


def _span(bounds: list[float]) -> str:
    return f"{bounds[0]:.1f}–{bounds[1]:.1f}"


def table(results: dict) -> str:
    columns = ["model", "SVD of every layer s", "one validation eval s (range)", "floor s", "compact s (range)",
               "× floor", "statistics pass s", "probes + allocation s", "search on probe batches s", "validation s",
               "measuring the plan s", "probes (samples each)", "validation checks", "factorizable params kept"]
    cells = [[row["model"], f"{row['svd_s']:.1f}", f"{row['eval_s']:.1f} ({_span(row['eval_range_s'])})",
              f"{row['floor_s']:.1f}", f"{row['compact_s']:.1f} ({_span(row['compact_range_s'])})",
              f"{row['ratio']:.1f}", f"{row['statistics_s']:.1f}", f"{row['probes_s']:.1f}", f"{row['search_s']:.1f}",
              f"{row['validation_s']:.1f}", f"{row['measuring_s']:.1f}",
              f"{row['probe_measurements']} ({row['probe_samples']})", f"{row['validation_checks']}",
              f"{row['factorizable_kept']:.1%}"] for row in results["rows"]]
    return "\n".join([f"### Cost of `compact` ({results['date']}, {results['machine']})", "",
                      *markdown_table(columns, cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", choices=sorted(ZOO))
    parser.add_argument("--probe-samples", type=int, help="calibration samples per probe (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per measurement, the median kept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(name, args.probe_samples, args.repeats) for name in args.models]
    results = write_rows(args.out, rows)
    print(table(results))


if __name__ == "__main__":
    main()
