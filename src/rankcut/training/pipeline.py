"""``rankcut train``: train a reference CNN (plainly, or over-parameterized with orthogonal regularization),
collapse it, compress it with a selector (EVBMF by default), optionally fine-tune, and report every step.

Every step leaves a checkpoint in the output directory (and training one per epoch), so running the same
command again after an interruption resumes where it stopped. All weights are safetensors; the run's state
is JSON.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from rankcut.api import compress as compress_model
from rankcut.checkpoint import atomic_write, load, save, write_text_atomic
from rankcut.counting import count_params
from rankcut.devices import usable_device
from rankcut.inventory import decomposition_named
from rankcut.models import CNN_MODELS
from rankcut.plan import format_table
from rankcut.selectors import parse_selector
from rankcut.tasks.fashion_mnist import DEFAULT_DATA_DIR, FashionMNISTTask
from rankcut.training.loop import one_cycle, sgd, train_epoch
from rankcut.training.overparam import collapse, overparameterize
from rankcut.training.regularizer import OrthogonalRegularizer

STATE_FILE = "state.json"
EPOCH_CHECKPOINT = "train-checkpoint.safetensors"
TRAINED_WEIGHTS = "trained.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result; a resumed run must use the same values."""

    model: str
    epochs: int
    overparam: float | None = None  # width factor of the trained factors; None trains the plain layers
    orth: float = 0.0  # weight λ of the orthogonality penalty (needs overparam)
    sparsity: float = 0.0  # weight μ of the spectrum-spread term (needs overparam)
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    select: str = "evbmf"
    decomposition: str = "auto"
    round_to: int = 1
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    train_subset: int | None = None  # train on the first N training images only (smoke runs)

    def __post_init__(self) -> None:
        if self.model not in CNN_MODELS:
            raise ValueError(f"--model must be one of {', '.join(sorted(CNN_MODELS))}, got {self.model!r}")
        if self.epochs < 1 or self.finetune_epochs < 0:
            raise ValueError("--epochs must be ≥ 1 and --finetune-epochs ≥ 0")
        if self.overparam is not None and self.overparam < 1:
            raise ValueError(f"--overparam is a width factor ≥ 1 (e.g. 2), got {self.overparam}")
        if self.overparam is None and (self.orth or self.sparsity):
            raise ValueError("--orth and --sparsity regularize over-parameterized factors: add --overparam (e.g. 2)")
        if self.orth < 0 or self.sparsity < 0:
            raise ValueError("--orth and --sparsity must be ≥ 0")
        if self.batch_size < 1 or self.round_to < 1:
            raise ValueError(f"--batch-size and --round-to must be ≥ 1, got {self.batch_size} and {self.round_to}")
        if not self.lr > 0 or not self.finetune_lr > 0:
            raise ValueError(f"--lr and --finetune-lr must be > 0, got {self.lr} and {self.finetune_lr}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(f"--train-subset must be at least the batch size ({self.batch_size})")
        # checked before training, not after it: a typo found then would strand the trained model
        try:
            parse_selector(self.select)
        except ValueError as error:
            raise ValueError(f"--select: {error}") from None
        if self.decomposition != "auto":
            try:
                decomposition_named(self.decomposition)
            except ValueError as error:
                raise ValueError(f"--decomposition: {error}") from None


def _fresh_model(config: TrainConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    return CNN_MODELS[config.model]()


def _measure(model: nn.Module, task: FashionMNISTTask) -> dict[str, Any]:
    """Validation and test metrics and the parameter count (the test split only reports, never chooses)."""
    return {"validation": task.evaluate(model, "validation"), "test": task.evaluate(model, "test"),
            "params": count_params(model)}


def finetune(model: nn.Module, task: FashionMNISTTask, epochs: int, lr: float, *, batch_size: int = 128,
             weight_decay: float = 5e-4, seed: int = 0, device: str | torch.device = "cpu",
             train_subset: int | None = None) -> nn.Module:
    """Fine-tune a (compressed) model on the train split: SGD with a cosine decay from ``lr`` to 0."""
    images, labels = _train_split(task, train_subset)
    model.to(device)
    optimizer = sgd(model, lr, weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        train_epoch(model, images, labels, optimizer, schedule, generator, batch_size=batch_size, device=device)
    return model.cpu().eval()


def _train_split(task: FashionMNISTTask, subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = task.split_tensors("train")
    return (images[:subset], labels[:subset]) if subset else (images, labels)


class TrainingRun:
    """One ``rankcut train`` run in ``out``: its steps, their checkpoints and the state that lets it resume."""

    def __init__(self, config: TrainConfig, out: str | Path, *, device: str = "cpu",
                 data_dir: str | Path = DEFAULT_DATA_DIR, log: Any = print) -> None:
        self.config = config
        self.out = Path(out)
        self.device = usable_device(device)
        self.task = FashionMNISTTask(config.model, data_dir=data_dir)
        self.log = log
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = self._read_state()

    def _read_state(self) -> dict[str, Any]:
        path = self.out / STATE_FILE
        if not path.is_file():
            if any(self.out.iterdir()):
                raise ValueError(f"{self.out} is not empty and holds no rankcut train run; choose an empty --out")
            return {"config": asdict(self.config), "steps": {}, "epochs_done": 0, "history": []}
        state = json.loads(path.read_text())
        saved = state.get("config", {})
        changed = [f"--{f.name.replace('_', '-')} {saved.get(f.name)!r} → {getattr(self.config, f.name)!r}"
                   for f in fields(self.config) if saved.get(f.name) != getattr(self.config, f.name)]
        if changed:
            raise ValueError(f"{self.out} holds a run with other settings ({'; '.join(changed)}); "
                             "repeat its command to resume, or choose another --out")
        return state

    def _save_state(self) -> None:
        write_text_atomic(self.out / STATE_FILE, json.dumps(self.state, indent=2))

    def _done(self, step: str, metrics: dict[str, Any], started: float) -> None:
        self.state["steps"][step] = {**metrics, "seconds": round(time.perf_counter() - started, 1)}
        self._save_state()
        test, validation = metrics["test"], metrics["validation"]
        self.log(f"[{step}] params {metrics['params']:,}  validation accuracy {validation['accuracy']:.4f}  "
                 f"test accuracy {test['accuracy']:.4f}  ({self.state['steps'][step]['seconds']} s)")

    def train(self) -> nn.Module:
        """The trained plain model (collapsed if over-parameterized), from its checkpoint when already done."""
        if "train" in self.state["steps"]:
            model = _fresh_model(self.config)
            model.load_state_dict(load_file(self.out / TRAINED_WEIGHTS))
            return model.eval()
        config, started = self.config, time.perf_counter()
        model = _fresh_model(self.config)
        regularizer = None
        if config.overparam is not None:
            overparameterize(model, config.overparam, seed=config.seed, inplace=True)
            if config.orth or config.sparsity:
                regularizer = OrthogonalRegularizer(model, config.orth, config.sparsity)
        model.to(self.device)
        images, labels = _train_split(self.task, config.train_subset)
        no_decay = regularizer.factor_parameters() if regularizer is not None and config.orth else []
        optimizer = sgd(model, config.lr, config.weight_decay, no_decay)
        steps_per_epoch = -(-len(labels) // config.batch_size)
        schedule = one_cycle(optimizer, config.lr, config.epochs, steps_per_epoch)
        generator = torch.Generator().manual_seed(config.seed)
        if self.state["epochs_done"]:
            self._resume(model, optimizer, generator)
            with warnings.catch_warnings():  # fast-forwarding the schedule: no optimizer step is meant
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                for _ in range(self.state["epochs_done"] * steps_per_epoch):
                    schedule.step()
            self.log(f"resuming after epoch {self.state['epochs_done']} of {config.epochs}")
        for epoch in range(self.state["epochs_done"] + 1, config.epochs + 1):
            epoch_start = time.perf_counter()
            stats = train_epoch(model, images, labels, optimizer, schedule, generator, batch_size=config.batch_size,
                                regularizer=regularizer, channels_last=self.device.type == "cpu", device=self.device)
            validation = self.task.evaluate(model, "validation")
            if regularizer is not None:
                with torch.no_grad():
                    stats.update({k: float(v) for k, v in regularizer.terms().items()})
            self.state["history"].append({"epoch": epoch, **stats, "validation": validation,
                                          "seconds": round(time.perf_counter() - epoch_start, 1),
                                          "threads": torch.get_num_threads(), "device": str(self.device)})
            self._checkpoint(model, optimizer, generator)
            self.state["epochs_done"] = epoch
            self._save_state()
            self.log(f"epoch {epoch}/{config.epochs}  loss {stats['loss']:.4f}  regularizer "
                     f"{stats['regularizer']:.4g}  validation accuracy {validation['accuracy']:.4f}  "
                     f"({time.perf_counter() - epoch_start:.0f} s)")
        model = model.cpu().eval()
        if config.overparam is not None:
            collapse(model)
        atomic_write(self.out / TRAINED_WEIGHTS, lambda path: save_model(model, path))
        self._done("train", _measure(model, self.task), started)
        (self.out / EPOCH_CHECKPOINT).unlink(missing_ok=True)
        return model

    def _checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Model, optimizer momenta and the data-order generator after an epoch, in one safetensors file."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        for index, parameter in enumerate(_optimized(optimizer)):
            buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum.{index}"] = buffer.detach().cpu().contiguous()
        tensors["generator"] = generator.get_state()
        atomic_write(self.out / EPOCH_CHECKPOINT, lambda path: save_file(tensors, path))

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        tensors = load_file(self.out / EPOCH_CHECKPOINT)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        for index, parameter in enumerate(_optimized(optimizer)):
            if f"momentum.{index}" in tensors:
                optimizer.state[parameter]["momentum_buffer"] = tensors[f"momentum.{index}"].to(parameter.device)
        generator.set_state(tensors["generator"])

    def compress(self, model: nn.Module) -> nn.Module:
        """The trained model compressed with the configured selector (loaded back when already done)."""
        directory = self.out / "compressed"
        if "compress" in self.state["steps"]:
            return load(directory, model=_fresh_model(self.config))
        started = time.perf_counter()
        compressed, report = compress_model(model, self.config.select, task=self.task,
                                            decomposition=self.config.decomposition,
                                            round_to=self.config.round_to, progress=False)
        self.log(report.summary())
        save(compressed, directory, report=report, force=True)
        before, after = report.factorizable_params
        self._done("compress", {**_measure(compressed, self.task), "factorizable_params_kept": after / before},
                   started)
        return compressed

    def finetune(self, model: nn.Module) -> nn.Module:
        """The compressed model after ``finetune_epochs`` of fine-tuning (loaded back when already done)."""
        directory = self.out / "finetuned"
        if "finetune" in self.state["steps"]:
            return load(directory, model=_fresh_model(self.config))
        config, started = self.config, time.perf_counter()
        model = finetune(model, self.task, config.finetune_epochs, config.finetune_lr,
                         batch_size=config.batch_size, weight_decay=config.weight_decay, seed=config.seed,
                         device=self.device, train_subset=config.train_subset)
        save(model, directory, force=True)
        self._done("finetune", _measure(model, self.task), started)
        return model

    def run(self) -> dict[str, Any]:
        """Train → collapse → compress → fine-tune, skipping the steps already done; returns the steps' metrics."""
        model = self.compress(self.train())
        if self.config.finetune_epochs:
            self.finetune(model)
        self.log(self.table())
        return self.state["steps"]

    def table(self) -> str:
        """One row per finished step: params, validation and test accuracy, seconds."""
        rows = [("step", "params", "validation acc", "test acc", "test loss", "seconds")]
        for step, metrics in self.state["steps"].items():
            rows.append((step, f"{metrics['params']:,}", f"{metrics['validation']['accuracy']:.4f}",
                         f"{metrics['test']['accuracy']:.4f}", f"{metrics['test']['loss']:.4f}",
                         str(metrics["seconds"])))
        return format_table(rows)


def _optimized(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
