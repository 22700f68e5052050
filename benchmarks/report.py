"""Turn sweep JSON files into benchmarks/RESULTS.md tables and PNG plots.

    python benchmarks/report.py benchmarks/results/*.json --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
from calibration import table as calibration_table
from common import closest_rivals, markdown_table
from cost import table as cost_table
from paired import table as paired_table
from scale import table as scale_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def table(results: dict, name: str) -> str:
    """One markdown table: method × budget → kept shares, test metric, compression time, latency."""
    metric = results["metric"]
    base = results["original"]
    lines = [
        f"### {results['model']} on {results['task']} ({results['date']}, {results['machine']}; results/{name}.json)",
        "",
        f"Original: {base['params']:,} params ({base['factorizable_params']:,} in factorizable layers), "
        f"{base['macs']:,} MACs per example batch, test {metric} = {base['metrics'][metric]:.4f}.",
        "",
    ]
    rows = []
    for row in sorted(results["rows"], key=lambda r: (-r["budget"], r["method"])):
        value = row["metrics"][metric]
        latency = row["latency_ms"]
        cells = [f"{row['budget']:.0%}", row["method"], f"{row['factorizable_kept']:.1%}", f"{row['params_kept']:.1%}",
                 f"{row['macs_kept']:.1%}", f"{value:.4f}", f"{value - base['metrics'][metric]:+.4f}",
                 f"{row['compress_seconds']:.1f}"]
        for batch in ("1", "32"):
            times = latency.get(batch)
            cells.append(f"{times['compressed']:.2f} ({times['original']:.2f})" if times else "-")
        rows.append(cells)
    columns = ["budget", "method", "factorizable params kept", "params kept", "MACs kept", f"test {metric}",
               "Δ vs original", "compress s", "latency b1 ms (orig)", "latency b32 ms (orig)"]
    return "\n".join([*lines, *markdown_table(columns, rows)])


def is_paired(results: dict) -> bool:
    """A results file of ``paired.py`` (its rows carry p-values)."""
    return "p_value" in results.get("rows", [{}])[0]


def lossless_check(sweeps: list[tuple[str, dict]]) -> str:
    """Per model and budget: the best ``lossless*`` row against the best other row (``closest_rivals``)."""
    rows, verdicts = [], []
    for name, results in sweeps:
        metric = results["metric"]
        for budget, best, rival in closest_rivals(results):
            gap = best["metrics"][metric] - rival["metrics"][metric]
            verdict = "better" if gap > 1e-9 else "tie" if gap > -1e-9 else "behind"
            verdicts.append(verdict)
            rows.append([name, f"{budget:.0%}", f"{best['method']} {best['metrics'][metric]:.4f}",
                         f"{rival['method']} {rival['metrics'][metric]:.4f}", f"{gap:+.4f}", verdict])
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in ("better", "tie", "behind"))
    columns = ["table", "budget", "best lossless row", "best other row", "lossless − other", "verdict"]
    lines = ["### Is lossless the best at every budget? (generated from the sweep tables)", "",
             *markdown_table(columns, rows)]
    lines += ["", f"lossless (its best variant) against every other row at the same budget: {counts}, of "
              f"{len(verdicts)} cells. One test example is worth 0.0001 on Fashion-MNIST (10,000 images) and "
              "0.001 on WordNet (1,000 glosses): gaps of a few examples are not significant."]
    return "\n".join(lines)


def compressible_table(results: dict) -> str:
    """Plain vs compressible training (``compressible.py``): each arm × compression → kept share, test accuracy."""
    finetune = f"{results['finetune_epochs']} epoch"
    if results.get("finetune_subset"):
        finetune += f" on {results['finetune_subset']:,} training images"
    lines = [
        f"### Compressible training: {results['model']} ({results['date']}, {results['machine']}, torch "
        f"{results['torch']})",
        "",
        f"Every arm: {results['epochs']} epochs, seed {results['seed']}, same data order. Fine-tune: {finetune}, "
        "SGD with cosine decay from 0.01.",
        "",
    ]
    rows = [[arm["arm"], f"{arm['trained']['test']['accuracy']:.4f}", label, f"{row['factorizable_kept']:.1%}",
             f"{row['test']['accuracy']:.4f}", f"{row['test_finetuned']['accuracy']:.4f}"]
            for arm in results["arms"] for label, row in arm["compressions"].items()]
    lines += markdown_table(["arm", "trained test acc", "compression", "factorizable params kept", "test acc",
                             "test acc fine-tuned"], rows)
    lines.append("")
    for arm in results["arms"]:
        config, history = arm["config"], arm["history"]
        if "orthogonality" in history[-1]:
            path = " → ".join(f"{h['orthogonality']:.2f}" for h in history)
            spreads = " → ".join(f"{h['spread']:.2f}" for h in history)
            lines.append(f"- {arm['arm']}: overparam {config['overparam']:g}, λ = {config['orth']:g}, μ = "
                         f"{config['sparsity']:g}. Orthogonality penalty summed over layers, per epoch: {path}; "
                         f"spread summed: {spreads}.")
    return "\n".join(lines)


def plot(results: dict, out_dir: Path, name: str) -> Path:
    """Metric vs factorizable params kept (left) and batch-32 latency vs MACs kept (right), one line per method."""
    metric = results["metric"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({row["method"] for row in results["rows"]})
    for method in methods:
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["factorizable_kept"])
        kept = [r["factorizable_kept"] for r in rows]
        left.plot(kept, [r["metrics"][metric] for r in rows], marker="o", label=method)
        right.scatter([r["macs_kept"] for r in rows],
                      [r["latency_ms"]["32"]["compressed"] / r["latency_ms"]["32"]["original"] for r in rows],
                      label=method)
    left.axhline(results["original"]["metrics"][metric], color="black", linestyle="--", label="original")
    left.set(xlabel="share of factorizable params kept", ylabel=f"test {metric}", title=results["model"])
    right.axhline(1.0, color="black", linestyle="--")
    right.set(xlabel="share of MACs kept", ylabel="latency / original (batch 32)", title="is it faster?")
    left.legend(fontsize=7)
    figure.tight_layout()
    path = out_dir / f"{name}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--preamble", type=Path, default=Path(__file__).with_name("PREAMBLE.md"))
    args = parser.parse_args()
    sections = [args.preamble.read_text().rstrip()] if args.preamble.is_file() else []
    loaded = [(path, json.loads(path.read_text())) for path in args.results]
    sections.append(lossless_check([(path.stem, results) for path, results in loaded if "metrics" in
                                    results.get("rows", [{}])[0]]))
    # the verdicts' significance, right after them
    sections += [paired_table(results) for _, results in loaded if is_paired(results)]
    for path, results in loaded:
        if is_paired(results):
            continue
        if "arms" in results:
            sections.append(compressible_table(results))
            continue
        if "floor_s" in results.get("rows", [{}])[0]:
            sections.append(cost_table(results))
            continue
        if "peak_mib" in results.get("rows", [{}])[0]:
            sections.append(scale_table(results))
            continue
        if "calibration_samples" in results.get("rows", [{}])[0]:
            sections.append(calibration_table(results))
            continue
        image = plot(results, args.out.parent, path.stem)
        sections.append(table(results, path.stem) + f"\n\n![{path.stem}]({image.name})")
    args.out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
