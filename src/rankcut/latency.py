"""CPU latency of models, measured the same way for the original and the compressed one, interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from rankcut.tasks.base import ModelInputs, call_model


def resize_batch(inputs: ModelInputs, batch_size: int) -> ModelInputs:
    """Example inputs repeated or cut along the batch dimension to ``batch_size`` rows."""
    def one(value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        reps = -(-batch_size // value.shape[0])
        return value.repeat(reps, *([1] * (value.dim() - 1)))[:batch_size]

    if isinstance(inputs, Mapping):
        return {key: one(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(one(value) for value in inputs)
    return one(inputs)


def compare_latency(models: Mapping[str, nn.Module], example_inputs: ModelInputs,
                    batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 20,
                    warmup: int = 3) -> dict[int, dict[str, float]]:
    """Median seconds per forward pass of each model at each batch size; runs alternate between models."""
    results: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            inputs = resize_batch(example_inputs, batch_size)
            for model in models.values():
                for _ in range(warmup):
                    call_model(model, inputs)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    call_model(model, inputs)
                    times[name].append(time.perf_counter() - start)
            results[batch_size] = {name: statistics.median(values) for name, values in times.items()}
    return results
