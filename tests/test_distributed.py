"""Two CPU processes under torchrun (gloo) reach exactly the single-process plan, sharing the work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
COMMAND = ["-m", "rankcut", "compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task",
           "--split", "none", "--no-progress"]
LOSS_AWARE = ["--calibration-samples", "64", "--batch-size", "16"]


def run(prefix: list[str], report: Path, select: str) -> None:
    environment = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    options = LOSS_AWARE if select.startswith("lossless") else []
    result = subprocess.run([sys.executable, *prefix, *COMMAND, *options, "--select", select, "--report", str(report)],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def layers(report: Path) -> list[tuple]:
    written = json.loads(report.read_text())
    return [(layer["name"], layer["rank"], layer["components"], layer["reason"]) for layer in written["layers"]]


@pytest.mark.parametrize("select", ["lossless:params=0.5", "budget:params=0.5"])
def test_two_processes_make_the_single_process_plan(tmp_path, select):
    run([], tmp_path / "one.json", select)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "two.json", select)
    single, double = layers(tmp_path / "one.json"), layers(tmp_path / "two.json")
    assert any(rank is not None for _, rank, _, _ in single)
    assert double == single
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
