"""The container a factorized layer becomes: standard modules in sequence, so export and compile just work."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class Factorized(nn.Sequential):
    """A chain of plain ``nn.Linear``/``nn.ConvNd`` modules that replaces one dense layer.

    It records which decomposition and rank produced it, for printing and for checks; the forward pass is
    ``nn.Sequential``'s, so TorchScript, ``torch.compile`` and ONNX export see only standard modules.
    """

    def __init__(self, modules: Sequence[nn.Module], decomposition: str, rank: int | tuple[int, ...]) -> None:
        super().__init__(*modules)
        self.decomposition = decomposition
        self.rank = rank

    def extra_repr(self) -> str:
        return f"decomposition={self.decomposition}, rank={self.rank}"
