"""Are the "Is lossless the best" verdicts beyond noise? A paired exact test on the test images.

    python benchmarks/paired.py results/resnext.json results/vgg.json --out results/paired.json

For every budget of each sweep file, the best ``lossless*`` row and the best other row (as the generated table
picks them, ``common.closest_rivals``) are rebuilt with the sweep's own settings, and both models score the
same test examples (Fashion-MNIST images classified, WordNet glosses retrieved at top 1). Only the examples
that one model gets right and the other wrong tell them apart; under "equally good" each such example is a
fair coin, so the two-sided exact binomial (McNemar) p-value says how often a split at least this lopsided
comes from chance. Rows whose rebuilt metric differs from the file's are flagged.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from common import closest_rivals, markdown_table, write_rows
from sweep import method_builders
from torch import nn

from rankcut.inventory import scan
from rankcut.sources import ZOO
from rankcut.tasks.fashion_mnist import FashionMNISTTask
from rankcut.tasks.wordnet import WordNetGlossTask


def right_examples(model: nn.Module, task: FashionMNISTTask | WordNetGlossTask) -> torch.Tensor:
    """Per test example: whether the model gets it right at the task's headline metric (top 1)."""
    if isinstance(task, WordNetGlossTask):
        logits, targets = task.retrieval_logits(model, "test")
        return logits.argmax(1) == targets
    return torch.cat([logits.argmax(1) == labels for logits, labels in task.batch_logits(model, "test")])


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value of ``only_first`` against ``only_second`` discordant images under a fair coin."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def p_text(p: float) -> str:
    """A p-value to three decimals, or "< 0.001"."""
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def compare(path: Path) -> list[dict]:
    """The paired test of every budget's lossless row against its closest rival in one sweep file."""
    results = json.loads(path.read_text())
    task = ZOO[results["model"]].task()
    if not isinstance(task, (FashionMNISTTask, WordNetGlossTask)):
        raise ValueError(f"{path}: paired tests score Fashion-MNIST or WordNet examples, not {results['task']}")
    original = task.build_model()
    metric = results["metric"]
    builders = method_builders(original, task, scan(original, task.example_inputs(), "svd"), None)
    rows = []
    for budget, ours, rival in closest_rivals(results):
        torch.manual_seed(0)  # as sweep.py seeds before its rows
        right = {}
        for row in (ours, rival):
            right[row["method"]] = right_examples(builders[row["method"]](budget)[0], task)
        first, second = right[ours["method"]], right[rival["method"]]
        only_ours, only_rival = int((first & ~second).sum()), int((second & ~first).sum())
        rebuilt = {name: round(float(value.float().mean()), 4) for name, value in right.items()}
        row = {"table": path.stem, "budget": budget, "lossless": ours["method"], "rival": rival["method"],
               "in_table": {ours["method"]: ours["metrics"][metric], rival["method"]: rival["metrics"][metric]},
               "rebuilt": rebuilt, "only_lossless_right": only_ours, "only_rival_right": only_rival,
               "p_value": mcnemar_p(only_ours, only_rival)}
        rows.append(row)
        print(f"{path.stem} {budget:.0%}: {ours['method']} {rebuilt[ours['method']]:.4f} vs {rival['method']} "
              f"{rebuilt[rival['method']]:.4f}: {only_ours} / {only_rival} examples, p = {row['p_value']:.2g}",
              flush=True)
    return rows


def table(results: dict) -> str:
    """The markdown table of a paired.json."""
    cells = []
    for row in results["rows"]:
        same = all(abs(row["rebuilt"][name] - value) < 5e-5 for name, value in row["in_table"].items())
        cells.append([row["table"], f"{row['budget']:.0%}", row["lossless"], row["rival"],
                      f"{row['only_lossless_right']}", f"{row['only_rival_right']}", p_text(row["p_value"]),
                      "yes" if same else "no: " + str(row["rebuilt"])])
    columns = ["table", "budget", "lossless row", "rival row", "test examples only lossless gets right",
               "only the rival", "p (two-sided exact)", "rebuilt as in the table"]
    return "\n".join([f"### Paired test of the verdicts ({results['date']}, {results['machine']}; results/paired.json)",
                      "", *markdown_table(columns, cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="sweep files (Fashion-MNIST or WordNet)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for path in args.results for row in compare(path)]
    print(table(write_rows(args.out, rows)))


if __name__ == "__main__":
    main()
