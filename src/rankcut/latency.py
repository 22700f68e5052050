"""Latency: whole models (original and compressed, interleaved) and single layers (the latency guard), on their device
(a GPU is waited for before each clock reading)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankcut.devices import synchronize
from rankcut.layers import Decomposition, LayerInfo, Rank
from rankcut.layers.decompositions import dense_module
from rankcut.tasks.base import PASS_EXAMPLE_INPUTS, ModelInputs, feed, map_tensors, model_device, on_device

# Seconds one forward pass of a module takes on an input.
Timer = Callable[[nn.Module, torch.Tensor], float]


def resize_batch(inputs: ModelInputs, batch_size: int) -> ModelInputs:
    """Example inputs repeated or cut along the batch dimension to ``batch_size`` rows."""
    def resized(value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 0:
            return value
        reps = -(-batch_size // value.shape[0])
        return value.repeat(reps, *([1] * (value.dim() - 1)))[:batch_size]

    return map_tensors(inputs, resized)


def compare_latency(models: Mapping[str, nn.Module], example_inputs: ModelInputs,
                    batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 20,
                    warmup: int = 3) -> dict[int, dict[str, float]]:
    """Median seconds per forward pass of each model at each batch size; runs alternate between models."""
    results: dict[int, dict[str, float]] = {}
    devices = {name: model_device(model) for name, model in models.items()}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            resized = resize_batch(example_inputs, batch_size)
            inputs = {name: on_device(resized, devices[name]) for name in models}  # moved once
            for name, model in models.items():
                for _ in range(warmup):
                    feed(model, inputs[name])
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    synchronize(devices[name])
                    start = time.perf_counter()
                    feed(model, inputs[name])
                    synchronize(devices[name])
                    times[name].append(time.perf_counter() - start)
            results[batch_size] = {name: statistics.median(values) for name, values in times.items()}
    return results


def median_seconds(module: nn.Module, inputs: torch.Tensor, repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of ``repeats`` forward passes of ``module`` on ``inputs``, after ``warmup`` untimed ones."""
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            synchronize(inputs.device)
            start = time.perf_counter()
            module(inputs)
            synchronize(inputs.device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


class LatencyGuard:
    """Keeps a layer dense at ranks where its factors run no faster than the dense layer on this machine.

    Each layer is timed on a random input of the shape it saw in the example forward pass (so pass the
    batch you will serve). Factor latency grows with rank, so the largest rank that is faster than the
    dense layer is found by bisection over the candidate ranks; layers of the same shape share one search.
    Timings are noisy: a plan made with the guard can differ between runs and machines.
    """

    def __init__(self, timer: Timer | None = None, repeats: int = 15) -> None:
        self.timer = timer or (lambda module, inputs: median_seconds(module, inputs, repeats))
        self._searches: dict[Any, tuple[float, dict[Rank, float], Rank | None]] = {}

    @staticmethod
    def _key(info: LayerInfo, decomposition: Decomposition, ranks: Sequence[Rank]) -> tuple:
        options = tuple(sorted((k, str(v)) for k, v in info.conv_options.items()))
        return (info.kind, info.weight_shape, info.groups, info.has_bias, options, info.input_shape,
                decomposition.name, tuple(ranks))

    def search(self, info: LayerInfo, decomposition: Decomposition,
               ranks: Sequence[Rank]) -> tuple[float, dict[Rank, float], Rank | None]:
        """Dense seconds, the seconds measured per rank, and the largest of ``ranks`` (sorted by size) that is
        faster than dense (None: none is)."""
        if not info.input_shape:
            raise ValueError(f"layer {info.name!r}: the latency guard needs example inputs to know the layer's "
                             f"input shape; {PASS_EXAMPLE_INPUTS}")
        key = self._key(info, decomposition, ranks)
        if key not in self._searches:
            inputs = torch.randn(*info.input_shape, dtype=info.dtype, device=info.device)
            dense_seconds = self.timer(dense_module(info), inputs)
            measured: dict[Rank, float] = {}
            low, high = -1, len(ranks)  # ranks[low] is faster (or low = -1); ranks[high] is not (or high = len)
            while high - low > 1:
                middle = (low + high) // 2
                measured[ranks[middle]] = self.timer(decomposition.build(info, ranks[middle]), inputs)
                low, high = (middle, high) if measured[ranks[middle]] < dense_seconds else (low, middle)
            self._searches[key] = (dense_seconds, measured, ranks[low] if low >= 0 else None)
        return self._searches[key]
