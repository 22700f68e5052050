"""What rankcut needs to know about one factorizable layer, read from the module without changing it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.lazy import LazyModuleMixin

_CONV_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face GPT-2's ``Conv1D`` (a linear layer with a transposed weight), without importing it."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


@dataclass(frozen=True)
class LayerInfo:
    """Shape and hyper-parameters of a Linear, HF Conv1D or ConvNd layer, with its weight as grouped kernels.

    ``input_positions``/``output_positions`` count the spatial positions (or tokens) seen in one forward
    pass on the example inputs; they turn per-position costs into MACs and stay 0 when not measured.
    ``input_shape`` is the shape of the layer's first input in that pass (empty when not measured).
    """

    name: str
    kind: str  # "linear", "hf_conv1d", "conv1d", "conv2d", "conv3d"
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    has_bias: bool
    dtype: torch.dtype
    device: torch.device
    conv_options: dict[str, Any] = field(default_factory=dict)
    input_positions: int = 0
    output_positions: int = 0
    input_shape: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the module's own weight tensor (HF Conv1D stores it transposed)."""
        if self.kind == "hf_conv1d":
            return (self.in_channels, self.out_channels)
        return (self.out_channels, self.in_per_group, *self.kernel_size)

    @property
    def dense_params(self) -> int:
        return self.out_channels * self.in_per_group * self.kernel_volume + (self.out_channels if self.has_bias else 0)

    @property
    def dense_macs(self) -> int:
        return self.output_positions * self.out_channels * self.in_per_group * self.kernel_volume

    def with_positions(self, input_positions: int, output_positions: int,
                       input_shape: tuple[int, ...] = ()) -> LayerInfo:
        """A copy that knows how many positions the layer sees in one forward pass, and its input shape."""
        return LayerInfo(**{**self.__dict__, "input_positions": input_positions,
                            "output_positions": output_positions, "input_shape": tuple(input_shape)})


def kernel_of(module: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The weight as (groups, out per group, in per group, *kernel) in float64: what decompositions consume."""
    weight = module.weight.detach()
    if info.kind == "hf_conv1d":
        weight = weight.t()
    return weight.to(torch.float64).reshape(info.groups, info.out_per_group, info.in_per_group, *info.kernel_size)


def describe_layer(name: str, module: nn.Module) -> LayerInfo | None:
    """``LayerInfo`` for a supported layer type, or None for anything else."""
    if isinstance(module, LazyModuleMixin):
        return None
    if isinstance(module, nn.Linear):
        return LayerInfo(
            name, "linear", module.in_features, module.out_features, 1, (), module.bias is not None,
            module.weight.dtype, module.weight.device,
        )
    if is_hf_conv1d(module):
        n_in, n_out = module.weight.shape
        return LayerInfo(
            name, "hf_conv1d", n_in, n_out, 1, (), getattr(module, "bias", None) is not None,
            module.weight.dtype, module.weight.device,
        )
    for conv_type, kind in _CONV_KINDS.items():
        if isinstance(module, conv_type):
            options = {
                "stride": module.stride,
                "padding": module.padding,
                "dilation": module.dilation,
                "padding_mode": module.padding_mode,
            }
            return LayerInfo(
                name, kind, module.in_channels, module.out_channels, module.groups, tuple(module.kernel_size),
                module.bias is not None, module.weight.dtype, module.weight.device, options,
            )
    return None


def padded_like(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` padded as ``conv`` pads its input, and the padding still to pass to a plain conv of that geometry:
    modes other than zeros and the string paddings ("same", "valid") are applied here, leaving none."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0,) * len(conv.kernel_size)
    return x, tuple(conv.padding)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The layer's bias, detached, or None."""
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()
