"""What the benchmark scripts share: a description of the machine, the results file of a table of rows, and the
rows a sweep's lossless verdict compares."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch


def machine() -> str:
    """Architecture, torch's thread count and the torch version, for a table's caption."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: its header, the separator, then one line per row of cells."""
    return [_markdown_row(columns), "|" + "---|" * len(columns), *map(_markdown_row, rows)]


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_rows(out: Path, rows: list[dict]) -> dict:
    """Write ``rows`` with today's date and the machine to ``out`` (JSON); return what was written."""
    results = {"date": date.today().isoformat(), "rows": rows, "machine": machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def closest_rivals(results: dict) -> list[tuple[float, dict, dict]]:
    """Per budget of a sweep: its best ``lossless*`` row and the best other row that met the budget.

    A row met the budget when its factorizable params kept are within half a point of it (some baselines
    cannot reach a budget and keep more); ``compact*`` rows choose their own size and are left out.
    """
    metric = results["metric"]
    rows = [r for r in results["rows"] if r["budget"] is not None and not r["method"].startswith("compact")]
    pairs = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        met = [r for r in rows if r["budget"] == budget and r["factorizable_kept"] <= budget + 0.005]
        ours = [r for r in met if r["method"].startswith("lossless")]
        theirs = [r for r in met if not r["method"].startswith("lossless")]
        if ours and theirs:
            pairs.append((budget, max(ours, key=lambda r: r["metrics"][metric]),
                          max(theirs, key=lambda r: r["metrics"][metric])))
    return pairs
