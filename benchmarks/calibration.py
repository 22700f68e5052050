"""How many calibration samples do lossless and compact need? The same selection at several calibration sizes,
and on disjoint calibration subsets of one size.

    python benchmarks/calibration.py --out results/calibration.json

Each row is one ``LossAware`` run with ``calibration_samples=N`` (the probes use all of them, the default) on a
zoo model: the size it kept, its test and validation metric, its time, and how many layers got the rank they
get at the default of 512 samples. The sizes use the task's first N calibration samples, so a smaller size is
a prefix of a larger one. The subsets take N samples from a later start in the calibration split: how much
of a result is the choice of calibration samples. Same process, 2 cores; the validation split is the same in
every row.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, write_rows

import rankcut
from rankcut.joint import LossAware
from rankcut.plan import Plan
from rankcut.sources import ZOO
from rankcut.tasks.base import CALIBRATION_SAMPLES, Task

# (model, LossAware mode, fraction kept for lossless, decomposition, calibration sizes); the Fashion-MNIST
# calibration split holds 1,000 images, the WordNet one 512 glosses
RUNS = [
    ("resnet20", "compact", None, "svd", (64, 128, 256, 512, 1000)),
    ("resnet20", "lossless", 0.4, "svd", (64, 128, 256, 512, 1000)),
    ("minilm", "compact", None, "svd", (64, 128, 256, 512)),
    ("minilm", "lossless", 0.7, "svd", (64, 128, 256, 512)),
]
# (model, mode, fraction, decomposition, samples, first samples): disjoint subsets of the Fashion-MNIST split
# (the WordNet task sorts its calibration glosses by length, so its later batches are not a like subset)
SUBSETS = [
    ("resnet20", "compact", None, "svd", 320, (0, 320, 640)),
    ("resnet20", "lossless", 0.4, "svd", 320, (0, 320, 640)),
]


class CalibrationWindow:
    """A task whose calibration samples start ``first`` samples into its calibration split (a multiple of the
    batch size): the same task on another, disjoint subset."""

    def __init__(self, task: Task, first: int) -> None:
        self.task, self.first = task, first

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def calibration_batches(self, num_samples: int, batch_size: int) -> Iterator[Any]:
        if self.first % batch_size:
            raise ValueError(f"the window starts at {self.first}, not a multiple of the batch size {batch_size}")
        batches = self.task.calibration_batches(self.first + num_samples, batch_size)
        return itertools.islice(batches, self.first // batch_size, None)


def _kept(plan: Plan) -> float:
    supported = [layer for layer in plan.layers if layer.supported]
    return sum(layer.params_after for layer in supported) / sum(layer.params_before for layer in supported)


def measure(model_name: str, mode: str, fraction: float | None, decomposition: str, samples: int,
            first: int = 0) -> dict:
    task = ZOO[model_name].task()
    model = task.build_model()
    task = CalibrationWindow(task, first) if first else task
    selector = LossAware(mode, fraction, calibration_samples=samples, progress=False)
    start = time.perf_counter()  # compress: the selection, the factors and the batch norms recalibrated after them
    compressed, report = rankcut.compress(model, selector, task=task, decomposition=decomposition, progress=False)
    seconds, plan = time.perf_counter() - start, report.plan
    metric = task.metric_name
    row = {"model": model_name, "selector": selector.spec, "decomposition": decomposition,
           "calibration_samples": samples, "first_sample": first, "seconds": seconds, "factorizable_kept": _kept(plan),
           "test": task.evaluate(compressed, "test")[metric],
           "validation": task.evaluate(compressed, "validation")[metric],
           "original_test": task.evaluate(model, "test")[metric],
           "original_validation": task.evaluate(model, "validation")[metric], "metric": metric,
           "plan_source": plan.meta["selection"]["plan_source"],
           "ranks": {layer.name: layer.rank for layer in plan.layers if layer.supported}}
    print(f"{model_name} {selector.spec} {samples} from {first}: kept {row['factorizable_kept']:.1%}, "
          f"test {row['test']:.4f} (original {row['original_test']:.4f}), validation {row['validation']:.4f} "
          f"({row['original_validation']:.4f}), {seconds:.1f} s", flush=True)
    return row


def table(results: dict) -> str:
    """Rows grouped by model and selector; each layer's rank compared with the one chosen at the default size."""
    rows, cells = results["rows"], []
    for row in rows:
        default = next((other for other in rows if other["calibration_samples"] == CALIBRATION_SAMPLES
                        and not other["first_sample"]
                        and (other["model"], other["selector"], other["decomposition"])
                        == (row["model"], row["selector"], row["decomposition"])), None)
        same = (f"{sum(row['ranks'][name] == rank for name, rank in default['ranks'].items())} of "
                f"{len(default['ranks'])}" if default is not None else "-")
        samples = f"{row['calibration_samples']}" + (f" (from {row['first_sample']})" if row["first_sample"] else "")
        cells.append([row["model"], f"{row['selector']} ({row['decomposition']})", samples,
                      f"{row['factorizable_kept']:.1%}", f"{row['test']:.4f} ({row['original_test']:.4f})",
                      f"{row['validation']:.4f} ({row['original_validation']:.4f})", same, row["plan_source"],
                      f"{row['seconds']:.1f}"])
    columns = ["model", "selector", "calibration samples", "factorizable params kept", "test (original)",
               "validation (original)", "layers with the default's rank", "plan kept", "seconds"]
    return "\n".join([f"### Calibration size (`lossless` and `compact`; {results['date']}, {results['machine']}; "
                      "results/calibration.json)", "", *markdown_table(columns, cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=sorted({run[0] for run in RUNS}))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(model, mode, fraction, decomposition, samples)
            for model, mode, fraction, decomposition, sizes in RUNS if model in args.models for samples in sizes]
    rows += [measure(model, mode, fraction, decomposition, samples, first)
             for model, mode, fraction, decomposition, samples, starts in SUBSETS if model in args.models
             for first in starts]
    results = write_rows(args.out, rows)
    print(table(results))


if __name__ == "__main__":
    main()
