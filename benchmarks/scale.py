"""Large models and several processes: compression time with 1 and 2 processes, peak memory, the cache's saving.

    python benchmarks/scale.py --out results/scale.json

Every row is one ``rankcut compress`` command in a fresh process (``torchrun --standalone`` for two), timed
from outside; peak memory is the largest resident set of any process it started (``ru_maxrss``). Models:
the pretrained MiniLM zoo model (loss-aware ``lossless`` on its WordNet task, and ``budget``) and a
random-init BERT-base-sized encoder saved as a Hugging Face directory (``budget``: spectra only). The
floor row loads the model and reads every weight once, and does nothing else: the floor for peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, write_rows

# Runs a command, then prints the largest resident set (KiB) of any process it started: a fresh
# measurement per row, since ru_maxrss of children only grows within one process.
_MEASURE = ("import resource, subprocess, sys\n"
            "code = subprocess.run(sys.argv[1:]).returncode\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
            "sys.exit(code)\n")
# Loads the model and reads every weight once (transformers may map the weights file without reading it).
LOAD_ONLY = ("import sys\nfrom rankcut.sources import resolve_model\nmodel = resolve_model(sys.argv[1]).model\n"
              "print(sum(float(p.sum()) for p in model.parameters()))\n")


def run(label: str, command: list[str], processes: int = 1) -> dict:
    """Time ``command`` (a ``python -m ...`` argument list) in a fresh process and record its peak memory;
    for ``rankcut compress``, also the factorizable params kept and the report's basis counts."""
    report = Path(tempfile.mkstemp(suffix=".json")[1])
    if "compress" in command:
        command = [*command, "--report", str(report), "--force"]  # the temporary file exists already
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, *launcher, *command],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    peak_kib = int(result.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    row = {"label": label, "processes": processes, "seconds": round(seconds, 1), "peak_mib": round(peak_kib / 1024)}
    if report.stat().st_size:
        written = json.loads(report.read_text())
        params = written["params"]
        row["factorizable_kept"] = params["factorizable_after"] / params["factorizable_before"]
        row["bases"] = written["bases"]
    report.unlink()
    print(f"{label:70s} {processes} proc  {seconds:7.1f} s  peak {row['peak_mib']:6d} MiB  {row.get('bases', '')}",
          flush=True)
    return row


def bert_base(directory: Path) -> Path:
    """A random-init BERT-base-sized encoder (110M params) saved as a Hugging Face directory."""
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(directory)
    return directory


def weights_mib(model: str) -> float:
    from rankcut.sources import resolve_model

    loaded = resolve_model(model).model
    return sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**20


def compress(model: str, select: list[str], *extra: str) -> list[str]:
    return ["-m", "rankcut", "compress", model, "--select", *select, "--split", "none", "--no-progress", *extra]


def model_rows(name: str, model: str, selects: list[list[str]], cache: Path, randomized_above: int) -> list[dict]:
    """Load only; each selector with 1 and 2 processes; the first one at 30% kept, exact and with randomized SVD
    for the layers of at least ``randomized_above`` weights; the last one with --low-memory and with a cache."""
    rows = [run(f"{name}: load and read every weight (the floor)", ["-c", LOAD_ONLY, model])]
    for select in selects:
        rows.append(run(f"{name}: {' '.join(select)}", compress(model, select)))
        rows.append(run(f"{name}: {' '.join(select)}", compress(model, select), processes=2))
    smaller = [selects[0][0].replace("0.5", "0.3"), *selects[0][1:]]
    rows.append(run(f"{name}: {' '.join(smaller)}", compress(model, smaller)))
    rows.append(run(f"{name}: {' '.join(smaller)} --randomized-above {randomized_above}",
                    compress(model, smaller, "--randomized-above", str(randomized_above))))
    first = selects[-1]
    second = [first[0].replace("0.5", "0.3"), *first[1:]]
    rows.append(run(f"{name}: {' '.join(first)} --low-memory", compress(model, first, "--low-memory")))
    for label, select in (("first run", first), ("second run, another budget", second)):
        rows.append(run(f"{name}: {' '.join(select)} --cache-dir ({label})",
                        compress(model, select, "--cache-dir", str(cache))))
    size = weights_mib(model)
    for row in rows:
        row["model"], row["weights_mib"] = name, round(size)
    return rows


def table(results: dict) -> str:
    cells = []
    for row in results["rows"]:
        kept = f"{row['factorizable_kept']:.1%}" if "factorizable_kept" in row else "–"
        bases = row.get("bases")
        counts = (f"{bases['computed']} / {bases['cache_hits']} / {bases['randomized']} "
                  f"({bases['randomized_fallbacks']})" if bases else "–")
        cells.append([f"{row['model']} ({row['weights_mib']} MiB)", row["label"].split(": ", 1)[1],
                      f"{row['processes']}", f"{row['seconds']:.1f}", f"{row['peak_mib']}", kept, counts])
    columns = ["model (weights)", "command", "processes", "wall s", "peak MiB (largest process)",
               "factorizable params kept", "bases computed / from cache / randomized (fallbacks)"]
    return "\n".join([f"### Scale: processes, peak memory, cache ({results['date']}, {results['machine']}; "
                      "results/scale.json)", "", *markdown_table(columns, cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    parser.add_argument("--calibration-samples", type=int, default=256, help="for MiniLM's lossless rows")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rankcut-scale-") as scratch:
        scratch = Path(scratch)
        for name in args.models.split(","):
            if name == "minilm":  # FFN layers 384x1536 are randomized, attention 384x384 exact
                model, randomized_above = "minilm", 500_000
                selects = [["budget:params=0.5"],
                           ["lossless:params=0.5", "--calibration-samples", str(args.calibration_samples)]]
            elif name == "bert-base":  # FFN layers 768x3072 are randomized, attention 768x768 exact
                model, randomized_above = str(bert_base(scratch / "bert-base")), 2_000_000
                selects = [["budget:params=0.5"]]
            else:
                raise SystemExit(f"unknown model {name!r}")
            rows += model_rows(name, model, selects, scratch / f"cache-{name}", randomized_above)
    results = write_rows(args.out, rows)
    print(table(results))


if __name__ == "__main__":
    main()
