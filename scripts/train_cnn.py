"""Train a reference CNN on Fashion-MNIST and write the weights rankcut's Fashion-MNIST task loads.

Trains on the task's train split only (validation and calibration held out), reports validation accuracy per
epoch, evaluates the test split once at the end, and writes ``{model}-fashion-mnist.safetensors`` with a
``.json`` record of the run. Example::

    python scripts/train_cnn.py --model resnet20 --epochs 12 --seed 0 --out src/rankcut/weights/
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from rankcut.models import CNN_MODELS
from rankcut.tasks.fashion_mnist import FashionMNISTTask
from rankcut.training.loop import one_cycle, sgd, train_epoch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(CNN_MODELS))
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("src/rankcut/weights"))
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train in channels-last memory format (about 15%% faster for the ResNets on a 2-core CPU)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    task = FashionMNISTTask(args.model)
    images, labels = task.split_tensors("train")
    model = CNN_MODELS[args.model]()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(parameter.numel() for parameter in model.parameters())
    steps_per_epoch = -(-len(labels) // args.batch_size)
    optimizer = sgd(model, args.lr, args.weight_decay)
    schedule = one_cycle(optimizer, args.lr, args.epochs, steps_per_epoch)
    print(f"{args.model}: {params:,} parameters, {len(labels):,} training images, {args.epochs} epochs", flush=True)

    started = time.perf_counter()
    history = []
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = train_epoch(model, images, labels, optimizer, schedule, generator, batch_size=args.batch_size,
                                 channels_last=args.channels_last)["loss"]
        validation = task.evaluate(model, "validation")
        seconds = time.perf_counter() - epoch_start
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **{f"validation_{k}": v for k, v in validation.items()}}
        )
        print(
            f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  "
            f"validation accuracy {validation['accuracy']:.4f}  loss {validation['loss']:.4f}  {seconds:.0f} s",
            flush=True,
        )
    wall_time = time.perf_counter() - started

    model = model.to(memory_format=torch.contiguous_format).eval()
    validation = task.evaluate(model, "validation")
    test = task.evaluate(model, "test")
    print(f"final validation accuracy {validation['accuracy']:.4f}  test accuracy {test['accuracy']:.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.model}-fashion-mnist"
    save_model(model, f"{stem}.safetensors")
    record = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "params": params,
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "split": {
            "seed": task.seed,
            "validation_size": task.validation_size,
            "calibration_size": task.calibration_size,
            "train_size": len(labels),
        },
        "validation": validation,
        "test": test,
        "history": history,
        "wall_time_s": round(wall_time, 1),
        "torch_version": torch.__version__,
        "threads": args.threads,
    }
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {stem}.safetensors and {stem}.json", flush=True)


if __name__ == "__main__":
    main()
