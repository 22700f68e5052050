"""The container a factorized layer becomes: standard modules in sequence, so export and compile just work."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Factorized(nn.Sequential):
    """A chain of plain ``nn.Linear``/``nn.ConvNd`` modules that replaces one dense layer.

    It records which decomposition and rank produced it, for printing and for checks; the forward pass is
    ``nn.Sequential``'s, so TorchScript, ``torch.compile`` and ONNX export see only standard modules.
    """

    __jit_unused_properties__ = ("weight",)  # eager-only convenience: TorchScript compiles only the forward pass

    def __init__(self, modules: Sequence[nn.Module], decomposition: str, rank: int | tuple[int, ...]) -> None:
        super().__init__(*modules)
        self.decomposition = decomposition
        self.rank = rank

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the factors multiply out to, in ``nn.Linear``/``ConvNd`` layout (differentiable).

        For code that reads a layer's ``.weight`` (e.g. its dtype, as ViT's embeddings do); computed on access.
        """
        groups = getattr(self[0], "groups", 1)
        kernel_size = tuple(self[0].weight.shape[2:])  # all ones unless one factor is spatial
        total = None  # (groups, out per group, in per group, kernel volume)
        for module in self:
            weight = module.weight
            grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
            if grouped.shape[-1] > 1:
                kernel_size = tuple(weight.shape[2:])
            if total is None:
                total = grouped
            elif grouped.shape[-1] == 1:
                total = torch.einsum("gab,gbik->gaik", grouped[..., 0], total)
            else:
                total = torch.einsum("gbak,gai->gbik", grouped, total[..., 0])
        out_per_group, in_per_group = total.shape[1:3]
        return total.reshape(groups * out_per_group, in_per_group, *kernel_size)

    def extra_repr(self) -> str:
        return f"decomposition={self.decomposition}, rank={self.rank}"
