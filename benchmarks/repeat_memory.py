"""How much does peak memory vary from run to run? BERT-base-sized ``budget``, with and without --low-memory.

    cd benchmarks && python repeat_memory.py

Uses ``scale.py``'s measurement (a fresh process per run, its largest resident set) 4× for the floor and
the low-memory run, 2× for the default run, and prints the peaks in MiB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import scale


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rankcut-memory-") as scratch:
        model = str(scale.bert_base(Path(scratch) / "bert-base"))
        command = scale.compress(model, ["budget:params=0.5"])
        peaks: dict[str, list[int]] = {"floor": [], "budget": [], "budget --low-memory": []}
        for _ in range(4):
            peaks["floor"].append(scale.run("bert-base: floor", ["-c", scale.LOAD_ONLY, model])["peak_mib"])
            low = scale.run("bert-base: --low-memory", [*command, "--low-memory"])
            peaks["budget --low-memory"].append(low["peak_mib"])
        for _ in range(2):
            peaks["budget"].append(scale.run("bert-base: default", command)["peak_mib"])
    print(peaks)


if __name__ == "__main__":
    main()
