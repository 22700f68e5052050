"""Turn a finished ``rankcut train`` run into a committed reference model that the Fashion-MNIST task loads.

Copies the run's trained (collapsed) weights to ``{name}-fashion-mnist.safetensors`` and writes a ``.json``
record beside them: the commands that made them, the training settings, per-epoch history and the trained
model's validation and test metrics. ``name`` must be one of ``REFERENCE_MODELS``. Example::

    rankcut train fashion-mnist --model resnet20 --epochs 10 --overparam 2 --orth 0.01 --sparsity 0.1 \\
        --select budget:params=0.5 --decomposition svd --out runs/r20c-mu0.1
    python scripts/reference_from_run.py runs/r20c-mu0.1 resnet20-compressible

(the command that made the committed ``resnet20-compressible``; its record holds it too).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch

from rankcut.tasks.fashion_mnist import REFERENCE_MODELS, WEIGHTS_DIR
from rankcut.training.pipeline import STATE_FILE, TRAINED_WEIGHTS, TrainConfig


def train_command(config: dict, run: Path) -> str:
    """The ``rankcut train`` command line that reproduces ``config`` (options left at their defaults omitted)."""
    words = ["rankcut", "train", "fashion-mnist"]
    for field in fields(TrainConfig):
        value = config[field.name]
        if field.name in ("model", "epochs") or value != field.default:
            words += [f"--{field.name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join([*words, "--out", str(run)])


def record(state: dict, run: Path, name: str) -> dict:
    """The reference model's record, in the fields ``scripts/train_cnn.py`` writes plus the full settings."""
    config, trained = state["config"], state["steps"]["train"]
    return {
        "command": f"{train_command(config, run)} && {shlex.join(['python', *sys.argv])}",
        "model": config["model"],
        "params": trained["params"],
        **{key: config[key] for key in ("epochs", "seed", "lr", "batch_size", "weight_decay")},
        "config": config,
        "validation": trained["validation"],
        "test": trained["test"],
        "history": state["history"],
        "wall_time_s": trained["seconds"],
        "torch_version": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a rankcut train --out directory whose training step is done")
    parser.add_argument("name", choices=sorted(set(REFERENCE_MODELS) - set(REFERENCE_MODELS.values())))
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--force", action="store_true", help="replace existing weights of that name")
    args = parser.parse_args()

    state_path = args.run / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if "train" not in state.get("steps", {}):
        parser.error(f"{args.run} holds no finished rankcut train run ({STATE_FILE} without a 'train' step)")
    if state["config"]["model"] != REFERENCE_MODELS[args.name]:
        parser.error(f"{args.name!r} is a {REFERENCE_MODELS[args.name]}; the run trained a {state['config']['model']}")
    stem = args.out / f"{args.name}-fashion-mnist"
    if Path(f"{stem}.safetensors").exists() and not args.force:
        parser.error(f"{stem}.safetensors exists; add --force to replace it")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.run / TRAINED_WEIGHTS, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(record(state, args.run, args.name), indent=2) + "\n")
    print(f"wrote {stem}.safetensors and {stem}.json", flush=True)


if __name__ == "__main__":
    main()
