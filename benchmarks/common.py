"""What the benchmark scripts share: a description of the machine and the results file of a table of rows."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch


def machine() -> str:
    """Architecture, torch's thread count and the torch version, for a table's caption."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_rows(out: Path, rows: list[dict]) -> dict:
    """Write ``rows`` with today's date and the machine to ``out`` (JSON); return what was written."""
    results = {"date": date.today().isoformat(), "rows": rows, "machine": machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results
