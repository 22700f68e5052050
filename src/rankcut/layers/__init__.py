"""Layer adapters: turn one module into factor modules (and back into a skeleton for loading)."""

from rankcut.layers.decompositions import DECOMPOSITIONS, Components, Decomposition, Fit, Rank, get_decomposition
from rankcut.layers.factorized import Factorized
from rankcut.layers.info import LayerInfo, describe_layer

__all__ = ["DECOMPOSITIONS", "Components", "Decomposition", "Factorized", "Fit", "LayerInfo", "Rank",
           "describe_layer", "get_decomposition"]
