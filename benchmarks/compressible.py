"""Does compressible training pay? Plain vs over-parameterized + orthogonally regularized training, compressed.

    python benchmarks/compressible.py resnet20 --epochs 15 --device cuda --out results/compressible-resnet20.json

Each arm trains the same CNN with the same seed and epochs (``rankcut train``'s pipeline), then the trained
model is compressed four ways: EVBMF ranks as they fall, the global ``budget`` selector at each ``--kept``
share of factorizable params, and the loss-aware ``compact``. Each compressed model is scored on the test split
before and after ``--finetune-epochs`` of fine-tuning. Arms: ``plain``; ``orth`` (``--overparam``, ``--orth``);
``orth+sparse`` (the same, plus ``--sparsity``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

import rankcut
from rankcut.joint import LossAware
from rankcut.training.pipeline import TrainConfig, TrainingRun, finetune

ARMS = ("plain", "orth", "orth+sparse")


def arm_config(arm: str, args: argparse.Namespace) -> TrainConfig:
    """The training settings of one arm; everything but the over-parameterization and penalties is shared."""
    extra = {"plain": {}, "orth": {"overparam": args.overparam, "orth": args.orth},
             "orth+sparse": {"overparam": args.overparam, "orth": args.orth, "sparsity": args.sparsity}}[arm]
    return TrainConfig(model=args.model, epochs=args.epochs, seed=args.seed, train_subset=args.train_subset, **extra)


def score(compressed: nn.Module, report: rankcut.Report, run: TrainingRun, args: argparse.Namespace,
          started: float) -> dict:
    """Params kept, test metrics before and after fine-tuning, and compression wall time for one compression."""
    seconds = time.perf_counter() - started
    before, after = report.factorizable_params
    test = run.task.evaluate(compressed, "test")
    tuned = finetune(compressed, run.task, args.finetune_epochs, args.finetune_lr, seed=args.seed,
                     device=args.device, train_subset=args.finetune_subset or args.train_subset)
    return {"factorizable_kept": after / before, "params": report.params_after, "test": test,
            "test_finetuned": run.task.evaluate(tuned, "test"), "compress_s": round(seconds, 1)}


def evaluate_arm(arm: str, args: argparse.Namespace, work: Path) -> dict:
    run = TrainingRun(arm_config(arm, args), work / arm, device=args.device, data_dir=args.data_dir)
    trained = run.train()
    result = {"arm": arm, "config": run.state["config"], "trained": run.state["steps"]["train"],
              "history": run.state["history"], "compressions": {}}
    selections = {"evbmf": ("evbmf", "auto")}
    selections.update({f"budget:{kept:g}": (f"budget:params={kept:g}", "auto") for kept in args.kept})
    if args.compact:
        label = "compact" if args.compact_criterion == "loss" else f"compact:{args.compact_criterion}"
        selections[label] = (LossAware("compact", criterion=args.compact_criterion, progress=False), "svd")
    for label, (select, decomposition) in selections.items():
        started = time.perf_counter()
        compressed, report = rankcut.compress(trained, select, task=run.task, decomposition=decomposition,
                                              progress=False)
        result["compressions"][label] = score(compressed, report, run, args, started)
        row = result["compressions"][label]
        print(f"{args.model} {arm:12s} {label:12s} kept {row['factorizable_kept']:.3f}  "
              f"test {row['test']['accuracy']:.4f}  fine-tuned {row['test_finetuned']['accuracy']:.4f}", flush=True)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["resnet20", "resnet56", "resnext", "vgg"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    parser.add_argument("--overparam", type=float, default=2.0)
    parser.add_argument("--orth", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=1e-2)
    parser.add_argument("--kept", type=lambda text: [float(x) for x in text.split(",")], default=[0.6, 0.2])
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-subset", type=int, help="fine-tune on the first N training images only")
    parser.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compact-criterion", choices=["loss", "metric"], default="loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subset", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--work", type=Path, default=Path("runs/compressible"), help="training run directories")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args()
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results = {
        "model": args.model, "date": date.today().isoformat(), "epochs": args.epochs, "seed": args.seed,
        "kept": args.kept, "finetune_epochs": args.finetune_epochs,
        "finetune_subset": args.finetune_subset, "device": args.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "torch": torch.__version__, "arms": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for arm in args.arms.split(","):  # the file is rewritten after each arm, so a cut-off run keeps its arms
        results["arms"].append(evaluate_arm(arm, args, args.work / args.model))
        results["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} in {results['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
