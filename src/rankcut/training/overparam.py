"""Over-parameterized training: each layer's weight trained as a wider product U·diag(s)·Vᵀ, then collapsed.

The product is a ``torch.nn.utils.parametrize`` parametrization of the layer's own ``weight``, so an
over-parameterized model is still made of ``nn.Linear`` / ``nn.ConvNd`` modules and trains with any loop.
``collapse`` computes each weight once, with the same function the forward pass uses, and stores it as a
plain parameter: outputs before and after collapsing are bitwise identical.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from rankcut.inventory import IgnoreSpec, scan
from rankcut.layers.info import LayerInfo


class LowRankProduct(nn.Module):
    """Parametrize a weight as U·diag(s)·Vᵀ per group, with ``width`` ≥ the full rank components.

    For a layer with ``g`` groups, U is (g, out/g, width), s is (g, width) and V is (g, in/g·k, width), where
    k is the kernel volume; the product is reshaped to the layer's weight shape (transposed for HF Conv1D).
    """

    def __init__(self, info: LayerInfo, width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight_shape = info.weight_shape
        self.groups = info.groups
        self.rows = info.out_per_group
        self.cols = info.in_per_group * info.kernel_volume
        self.transposed = info.kind == "hf_conv1d"
        if width < min(self.rows, self.cols):
            raise ValueError(f"layer {info.name!r}: width {width} is below the full rank "
                             f"{min(self.rows, self.cols)}; over-parameterization needs factor ≥ 1")
        self.width = width
        self.generator = generator

    def forward(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        product = (U * s.unsqueeze(1)) @ V.transpose(1, 2)  # (g, rows, cols)
        if self.transposed:
            return product[0].t()
        return product.reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Factors whose product is ``weight``: its SVD, padded with random unit directions of zero strength.

        The extra columns get s = 0, so the layer computes the same function as before (up to rounding);
        their directions are random so that training can grow them.
        """
        matrix = weight.t() if self.transposed else weight
        grouped = matrix.detach().to(torch.float64).reshape(self.groups, self.rows, self.cols)
        U, s, Vh = torch.linalg.svd(grouped, full_matrices=False)
        extra = self.width - s.shape[1]
        device = self.generator.device if self.generator is not None else torch.device("cpu")  # where it draws
        options = {"dtype": torch.float64, "generator": self.generator, "device": device}
        U_extra = torch.randn(self.groups, self.rows, extra, **options).to(U.device) / math.sqrt(self.rows)
        V_extra = torch.randn(self.groups, self.cols, extra, **options).to(U.device) / math.sqrt(self.cols)
        U = torch.cat([U, U_extra], dim=2)
        V = torch.cat([Vh.transpose(1, 2), V_extra], dim=2)
        s = torch.cat([s, s.new_zeros(self.groups, extra)], dim=1)
        return tuple(t.to(weight.dtype).to(weight.device).contiguous() for t in (U, s, V))

    def extra_repr(self) -> str:
        return f"groups={self.groups}, rows={self.rows}, cols={self.cols}, width={self.width}"


def low_rank_products(model: nn.Module) -> list[tuple[str, nn.Module, LowRankProduct]]:
    """(name, layer, parametrization) for every over-parameterized layer of ``model``."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            first = module.parametrizations.weight[0]
            if isinstance(first, LowRankProduct):
                found.append((name, module, first))
    return found


def factors_of(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """The trainable (U, s, V) of an over-parameterized layer."""
    weight = module.parametrizations.weight
    return weight.original0, weight.original1, weight.original2


def overparameterize(model: nn.Module, factor: float = 2.0, *, ignore: IgnoreSpec = (), seed: int = 0,
                     inplace: bool = False) -> nn.Module:
    """Train-time over-parameterization: each factorizable layer's weight becomes U·diag(s)·Vᵀ.

    The width is ``ceil(factor × full rank)`` components (factor ≥ 1). The model computes the same function
    as before; ``collapse`` folds it back into plain layers after training. Returns a copy unless ``inplace``.
    """
    if not (isinstance(factor, (int, float)) and factor >= 1):
        raise ValueError(f"overparameterize: factor must be a number ≥ 1 (width = factor × full rank), got {factor!r}")
    target = model if inplace else copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    candidates = scan(target, ignore=ignore).factorizable()
    if not candidates:
        raise ValueError("overparameterize: this model has no factorizable layer (Linear, ConvNd or HF Conv1D)")
    for candidate in candidates:
        info = candidate.info
        width = math.ceil(factor * min(info.out_per_group, info.in_per_group * info.kernel_volume))
        product = LowRankProduct(info, width, generator)
        parametrize.register_parametrization(candidate.module, "weight", product)
        product.generator = None  # only needed by right_inverse at registration; keeps the model copyable
    return target


def collapse(model: nn.Module) -> nn.Module:
    """Fold every over-parameterized layer back into a plain weight, in place; outputs are unchanged bit for bit.

    In place only: torch shares a parametrized module's class between copies, so removing the
    parametrization from a deep copy would also break the original.
    """
    layers = low_rank_products(model)
    if not layers:
        raise ValueError("collapse: this model has no over-parameterized layer (made by rankcut.overparameterize)")
    for _, module, _ in layers:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
