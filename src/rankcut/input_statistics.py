"""What each layer sees: the Gram matrix of its inputs on calibration batches, for data-aware factorization.

A linear layer's input is a row per token; a conv's is a patch per output position (the same columns its
weight matrix multiplies, ``unfold``), split by group. ``Spectrum.whitened`` turns a weight and this Gram
matrix into a basis whose truncation error is the error of the layer's outputs on these inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.inventory import Candidate
from rankcut.layers import LayerInfo
from rankcut.layers.info import padded_like
from rankcut.tasks.base import Forward


def conv_patches(module: nn.Module, info: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    """The input patches a 1-D or 2-D conv multiplies its weight with: (positions, groups, in/g·k), the
    columns ordered like ``weight.reshape(out, -1)``. Padding (zeros, other modes, "same") as the layer pads."""
    if info.spatial_dims not in (1, 2):
        raise ValueError(f"layer {info.name!r}: input patches of a {info.spatial_dims}-D conv are not supported")
    kernel, stride, dilation = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation))
    x, padding = padded_like(module, x)
    if info.spatial_dims == 1:  # a 1-D conv is a 2-D conv over a height of one
        x, kernel, stride, dilation, padding = (x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation),
                                                (0, *padding))
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, in·k, L)
    return patches.transpose(1, 2).reshape(-1, info.groups, info.in_per_group * info.kernel_volume)


class _GramAccumulator:
    """Sums ``x xᵀ`` of one layer's inputs over every call, per group: each call's product in float32 (or the
    model's wider dtype), the running sum in float64."""

    def __init__(self, candidate: Candidate) -> None:
        self.info, self.module = candidate.info, candidate.module
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, _module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        x = inputs[0].detach()
        rows = conv_patches(self.module, self.info, x) if self.info.is_conv else x.reshape(-1, 1, x.shape[-1])
        rows = rows.transpose(0, 1)  # (g, positions, columns), multiplied in float32 or the model's wider dtype
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        gram = (rows.transpose(1, 2) @ rows).double()
        self.total = gram if self.total is None else self.total + gram
        self.count += rows.shape[1]


def input_grams(model: nn.Module, candidates: Sequence[Candidate], batches: Iterable[Any],
                forward: Forward) -> dict[str, torch.Tensor]:
    """Mean ``x xᵀ`` of each candidate's inputs over ``batches`` (forward passes, no gradients): (g, n, n).

    Refuses a layer that never ran, or whose inputs hold NaN or Inf: it could not be whitened honestly.
    """
    accumulators = {c.name: _GramAccumulator(c) for c in candidates}
    handles = [c.module.register_forward_hook(accumulators[c.name]) for c in candidates]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    grams = {}
    for name, accumulator in accumulators.items():
        if accumulator.total is None:
            raise ValueError(f"layer {name!r} never ran on the calibration batches, so its inputs are unknown: "
                             "ignore it or factorize it with a decomposition that reads only weights (svd)")
        if not torch.isfinite(accumulator.total).all():
            raise ValueError(f"layer {name!r} received NaN or Inf inputs on the calibration batches")
        grams[name] = accumulator.total / accumulator.count
    return grams
