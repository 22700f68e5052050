"""Replace rows of a results file with the same methods' rows from another sweep run.

    python merge.py results/bench-minilm.json /tmp/minilm.json --budgets 0.7,0.4

A row replaces the target's row of the same method and budget; ``compact`` and ``compact-metric`` choose
their own size, so theirs replace by method. ``--budgets`` keeps only the new run's rows at those budgets
(and the size-choosing ones). The two runs must be of the same model, task and original metrics (to 1e-6:
float sums differ slightly between CPUs).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sweep import SIZELESS


def key(row: dict) -> tuple[str, float | None]:
    return (row["method"], None if row["method"] in SIZELESS else round(row["budget"], 6))


def date_span(*dates: str) -> str:
    """The days the rows of merged runs come from: ``2026-11-23`` or ``2026-11-23 to 2026-11-24``."""
    days = sorted({day for text in dates for day in text.split(" to ")})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def merge(target: dict, new: dict, budgets: set[float] | None) -> dict:
    """``target`` with ``new``'s rows (those at ``budgets``, when given) in place of the same keys; its date
    becomes the span of both runs' dates."""
    before, after = target["original"]["metrics"], new["original"]["metrics"]
    if target["model"] != new["model"] or before.keys() != after.keys() or not all(
            math.isclose(before[name], after[name], rel_tol=1e-6) for name in before):  # float sums vary by CPU
        raise ValueError("the two files are not runs of the same model with the same original metrics")
    rows = [r for r in new["rows"] if budgets is None or r["method"] in SIZELESS or round(r["budget"], 6) in budgets]
    replaced = {key(r) for r in rows}
    return {**target, "date": date_span(target["date"], new["date"]),
            "rows": [r for r in target["rows"] if key(r) not in replaced] + rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--budgets", help="only the new run's rows at these budgets (comma-separated)")
    args = parser.parse_args()
    budgets = {round(float(b), 6) for b in args.budgets.split(",")} if args.budgets else None
    merged = merge(json.loads(args.target.read_text()), json.loads(args.new.read_text()), budgets)
    args.target.write_text(json.dumps(merged, indent=2))
    print(f"merged {args.new} into {args.target}")


if __name__ == "__main__":
    main()
