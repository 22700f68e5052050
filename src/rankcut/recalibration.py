"""Batch-norm statistics corrected after factorization by a paired shift: forward passes only, no training.

Truncating a layer shifts the mean and the scale of what the batch norms after it see, so their running
statistics (from training) no longer normalise it. Re-estimating them on a few calibration batches fixes most
of that, but swaps the training-set statistics for noisier ones even where nothing changed (measured on
ResNet-20: test accuracy 0.9325 → 0.9309 with no layer factorized). So the correction is paired: the same
batches run through the original and the factorized model in training mode, and each running mean moves by
the difference of the two estimates, each running variance by their ratio. A batch norm whose input did not
change keeps its statistics exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rankcut.tasks.base import Forward, batch_samples

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # batch norm name -> (running mean, running var)


def batch_norms(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's batch norms that keep running statistics, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None}


@contextmanager
def _buffers_restored(norms: Sequence[_BatchNorm]) -> Iterator[None]:
    """Within the block the batch norms may change their statistics, momentum and mode; all are restored."""
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum,
              bn.training) for bn in norms]
    try:
        yield
    finally:
        for bn, (mean, var, tracked, momentum, training) in zip(norms, saved, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(tracked)
            bn.momentum = momentum
            bn.train(training)


def estimate(model: nn.Module, batches: Sequence[Any], forward: Forward) -> Statistics:
    """The running statistics each batch norm gets from ``batches`` alone (training-mode forward passes,
    cumulative average); nothing else runs in training mode and the model is left as it was."""
    norms = batch_norms(model)
    with _buffers_restored(list(norms.values())), torch.no_grad():
        for bn in norms.values():
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
            bn.train()
        for batch in batches:
            forward(model, batch)
        return {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in norms.items()}


class BatchNormRecalibration:
    """The original model's statistics on fixed calibration batches, and the paired shift they give a
    factorized copy (or the same model with substituted weights)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], forward: Forward) -> None:
        self.batches, self.forward = list(batches), forward
        if not self.batches:
            raise ValueError("batch-norm recalibration needs at least one calibration batch")
        self.reference = estimate(model, self.batches, forward)
        self._estimates: dict[Hashable, Statistics] = {}

    def apply(self, model: nn.Module, key: Hashable | None = None) -> int:
        """Shift ``model``'s running statistics by (its estimate − the original's); the number of batch norms.

        ``key`` names the model's weights (e.g. which components each truncated layer keeps): the estimate
        made under a key is reused for it, which saves the forward passes when one plan is measured twice.
        """
        norms = batch_norms(model)
        missing = sorted(set(self.reference) - set(norms))
        if missing:
            raise ValueError(f"batch norms {missing[:3]} of the original model are missing from the one to "
                             "recalibrate: recalibrate a factorized copy of the same model")
        current = self._estimates.get(key) if key is not None else None
        if current is None:
            current = estimate(model, self.batches, self.forward)
            if key is not None:
                self._estimates[key] = current
        with torch.no_grad():
            for name, (mean, var) in current.items():
                reference_mean, reference_var = self.reference[name]
                bn = norms[name]
                bn.running_mean.add_(mean - reference_mean)
                ratio = torch.where(reference_var > 0, var / reference_var.clamp(min=1e-30), 1.0)
                bn.running_var.mul_(ratio)
        return len(current)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Shift a built model's statistics (``apply``) and say what was done, for its plan's meta."""
        return {"batch_norms": self.apply(model), "calibration_samples": sum(map(batch_samples, self.batches)),
                "how": "paired shift of running statistics (rankcut.recalibration), forward passes only"}

    @contextmanager
    def applied(self, model: nn.Module, key: Hashable | None = None) -> Iterator[None]:
        """Within the block, ``model``'s batch norms carry the shift (``apply``); their statistics are restored
        afterwards."""
        with _buffers_restored(list(batch_norms(model).values())):
            self.apply(model, key)
            yield
