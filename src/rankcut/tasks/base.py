"""The task contract: what rankcut needs to know about a model's job to measure and calibrate it.

A task bundles a model factory, example inputs (for counting MACs and for export), a loss on a batch, a
calibration loader and a metric on a named split. Built-in tasks implement it; users can pass their own
object with the same attributes (``module:function`` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# Inputs a model is called with: one tensor, a tuple of positional arguments, or keyword arguments.
ModelInputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]
Forward = Callable[[nn.Module, Any], Any]  # runs a model on one batch, e.g. a task's loss

SPLITS = ("calibration", "validation", "test")
# what callers ask ``calibration_batches`` for by default (loss-aware selection, batch-norm recalibration)
CALIBRATION_SAMPLES, BATCH_SIZE = 512, 64


def map_tensors(inputs: ModelInputs, change: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
    """Inputs with ``change`` applied to every tensor, the inputs themselves or the items of their tuple or
    mapping (one level: nested containers are left as they are; a mapping comes back as a plain dict)."""
    def one(value: Any) -> Any:
        return change(value) if isinstance(value, torch.Tensor) else value

    if isinstance(inputs, Mapping):
        return {key: one(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(one(value) for value in inputs)
    return one(inputs)


def on_device(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """Inputs with every tensor moved to ``device``."""
    return map_tensors(inputs, lambda tensor: tensor.to(device))


def feed(model: nn.Module, inputs: ModelInputs) -> Any:
    """Call ``model`` with inputs given as a tensor, a tuple of arguments or a mapping of keyword arguments,
    where they are (timed loops move them once, beforehand)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def call_model(model: nn.Module, inputs: ModelInputs) -> Any:
    """``feed`` the inputs moved to the model's device (a task's example inputs live on the CPU; the model may
    not)."""
    return feed(model, on_device(inputs, model_device(model)))


def describe_inputs(inputs: ModelInputs) -> str:
    """A short description of example inputs, e.g. ``input_ids 8x23`` or ``1x1x28x28``."""
    if isinstance(inputs, Mapping):
        items: Sequence = [(k, v) for k, v in inputs.items() if hasattr(v, "shape")][:1]
        return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in items)
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    return "x".join(map(str, first.shape)) if hasattr(first, "shape") else type(first).__name__


def run_example(model: nn.Module, inputs: ModelInputs) -> Any:
    """``call_model`` without gradients on example inputs; a model that cannot take them raises a ``ValueError``
    that names the inputs and what would fit, with the model's own message."""
    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as error:
        raise ValueError(f"the model does not run on its example inputs ({describe_inputs(inputs)}): "
                         f"{type(error).__name__}: {error}. Give inputs it takes: a task made for this model "
                         "(--task / task=) or example inputs of its shape (--input-shape / example_inputs=)"
                         ) from error


def batch_loss(loss: Forward, model: nn.Module, batch: Any) -> torch.Tensor:
    """The task's loss on one batch, checked to be one number (the batch's mean loss) before anything uses it."""
    value = loss(model, batch)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the task's loss must return one number per batch, the batch's mean loss as a scalar "
                         f"tensor; it returned {got} (reduce it, e.g. with .mean())")
    return value.reshape(())


PASS_EXAMPLE_INPUTS = ("pass example_inputs (--input-shape), or a task that gives them (a built-in task does; "
                       "LoaderTask takes example_inputs=...)")


def batch_samples(batch: Any) -> int:
    """How many samples a batch holds. A tensor: its first dimension. A mapping holds fields (Hugging Face
    style ``{"input_ids": ..., "attention_mask": ...}``, or a ``datasets`` batch of lists): the first dimension
    of its first tensor with one, else the length of its first list, else its first nested mapping's count. A
    list of tuples is uncollated, one tuple per sample (``DataLoader(..., collate_fn=lambda s: s)`` over
    ``(x, y)`` pairs; a DataLoader collates pairs into a list of fields, never into tuples). Any other tuple
    or list whose first item is a tensor, mapping, tuple or list holds fields (``(x, y)``, a collated
    ``[x, y]``): the first field's count. Any other list holds the samples themselves (``["a gloss", "b"]``).
    A string is one sample."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (str, bytes)):
        return 1
    if isinstance(batch, Mapping):  # its fields: one value per sample along their first dimension
        values = list(batch.values())
        tensor = next((v for v in values if isinstance(v, torch.Tensor) and v.dim()), None)
        if tensor is not None:
            return tensor.shape[0]
        column = next((v for v in values if isinstance(v, (tuple, list))), None)  # a datasets batch
        if column is not None:
            return len(column)
        nested = next((v for v in values if isinstance(v, Mapping)), None)
        return 1 if nested is None else batch_samples(nested)
    if isinstance(batch, list) and batch and all(isinstance(item, tuple) for item in batch):
        return len(batch)
    if isinstance(batch, (tuple, list)):
        if batch and isinstance(batch[0], (torch.Tensor, Mapping, tuple, list)):
            return batch_samples(batch[0])
        return len(batch)
    return len(batch) if hasattr(batch, "__len__") else 1


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@runtime_checkable
class Task(Protocol):
    """A model's job: how to build it, feed it, score it and calibrate on it.

    ``metric_name`` names the headline metric in the dict returned by ``evaluate`` (higher is better).
    The test split is for reporting only: selectors must calibrate on ``calibration`` and check on
    ``validation``.
    """

    name: str
    metric_name: str

    def build_model(self) -> nn.Module:
        """Return the reference model, with its trained weights, in eval mode."""
        ...

    def example_inputs(self) -> ModelInputs:
        """A small batch of real inputs, used to count MACs and to trace or export the model."""
        ...

    def calibration_batches(self, num_samples: int, batch_size: int) -> Iterable[Any]:
        """Batches from the calibration split, in a fixed order, for ``loss``."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training-style loss of ``model`` on one calibration batch (lower is better)."""
        ...

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (one of ``SPLITS``); includes ``metric_name``."""
        ...


class NotATask(TypeError):
    """An object given where a task is needed does not keep the task contract."""


def require_task(task: object, argument: str) -> Task:
    """``task`` when it keeps the task contract; otherwise ``NotATask`` naming the argument, what the object
    lacks, and the wrapper for a user's own batches."""
    if isinstance(task, Task):
        return task
    members = [*Task.__annotations__, *(name for name, value in vars(Task).items()
                                         if callable(value) and not name.startswith("_"))]
    missing = ", ".join(name for name in members if not hasattr(task, name))
    lacks = f"has no {missing}" if missing else "does not keep its contract"
    raise NotATask(f"{argument} must be a task (rankcut.tasks.base.Task); a {type(task).__name__} {lacks}. "
                    "For your own data pass rankcut.LoaderTask(calibration_batches, validation_batches, loss_fn), "
                    "where loss_fn(model, batch) returns the batch's mean loss")
