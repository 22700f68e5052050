"""Where each layer's basis (its SVD or Tucker spectra) comes from: computed, cached on disk, or kept on disk.

* ``cache_dir``: bases are stored by a hash of the weights, so a second run (another budget, another selector)
  reads them back instead of decomposing again.
* ``low_memory``: only singular values stay in memory; singular vectors are read from disk when a layer is
  factorized or probed, so the spectral selectors' peak memory stays near the model's own size plus one
  layer's working set (loss-aware statistics still hold every layer's vectors during their pass).
* ``randomized_above``: layers with at least that many weights get a randomized SVD of only the leading
  components that keep at most ``randomized_share`` of the layer's params (ranks above stay dense); each
  triplet's residual is checked, and a failed check falls back to the exact SVD.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from rankcut.cache import DiskCache, digest
from rankcut.layers import Decomposition, LayerInfo
from rankcut.linalg import RandomizedSVDError

_SMALL_TENSORS = ("S", "total_squares", "shape", "residual")


class BasisStore:
    """Computes, caches and serves layer bases; one store is shared by all candidates of a model."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, low_memory: bool = False,
                 randomized_above: int | None = None, randomized_share: float = 0.5) -> None:
        if randomized_above is not None and randomized_above < 1:
            raise ValueError(f"randomized_above must be a positive number of weights, got {randomized_above}")
        if not 0 < randomized_share < 1:
            raise ValueError(f"randomized_share must be in (0, 1), got {randomized_share}")
        self._temporary = None
        if cache_dir is None and low_memory:  # singular vectors need somewhere to live
            self._temporary = tempfile.TemporaryDirectory(prefix="rankcut-bases-")
            cache_dir = self._temporary.name
        self.disk = DiskCache(cache_dir) if cache_dir is not None else None
        self.low_memory, self.randomized_above, self.randomized_share = low_memory, randomized_above, randomized_share
        # per layer name, the inputs' Gram matrix, for decompositions that need inputs (``input_statistics``)
        self.input_grams: dict[str, torch.Tensor] = {}
        self.computed = self.cache_hits = self.randomized = self.fallbacks = 0
        self.worst_residual = 0.0

    def leading(self, info: LayerInfo, decomposition: Decomposition) -> int | None:
        """How many leading components a randomized SVD computes for this layer (None: the exact full SVD)."""
        if self.randomized_above is None or decomposition.name != "svd":
            return None
        weights = info.out_channels * info.in_per_group * info.kernel_volume
        if weights < self.randomized_above:
            return None
        rank = decomposition.rank_for_params(info, int(self.randomized_share * info.dense_params))
        return rank if rank is not None and rank < decomposition.max_rank(info) else None

    def _key(self, info: LayerInfo, decomposition: Decomposition, kernel: torch.Tensor) -> str:
        leading = self.leading(info, decomposition)
        tensors = [kernel, self._gram(info, decomposition)] if decomposition.needs_inputs else [kernel]
        return digest(tensors, decomposition.name, "exact" if leading is None else f"randomized:{leading}")

    def _gram(self, info: LayerInfo, decomposition: Decomposition) -> torch.Tensor:
        """The layer's input Gram matrix, which a decomposition that needs inputs cannot do without."""
        gram = self.input_grams.get(info.name)
        if gram is None:
            raise ValueError(f"layer {info.name!r}: {decomposition.name} needs the layer's calibration inputs; "
                             "pass a task (compress(..., task=...), apply(..., task=...), --task) or use svd")
        return gram

    def basis(self, info: LayerInfo, decomposition: Decomposition, kernel: torch.Tensor) -> Any:
        """The layer's basis: from the disk cache when there, else computed (and stored when caching)."""
        key = self._key(info, decomposition, kernel) if self.disk is not None else ""
        if self.disk is not None:
            found = self._read(decomposition, key, kernel.device)
            if found is not None:
                self.cache_hits += 1
                self._count_randomized(found)
                return found
        basis = self._compute(info, decomposition, kernel, self.leading(info, decomposition))
        if self.disk is None:
            return basis
        self.disk.save("bases", key, basis.tensors())
        return self._read(decomposition, key, kernel.device) if self.low_memory else basis

    def adopt(self, info: LayerInfo, decomposition: Decomposition, kernel: torch.Tensor,
              tensors: dict[str, torch.Tensor]) -> Any:
        """A basis computed elsewhere (another process): stored like one computed here, and served the same way."""
        tensors = {name: tensor.to(kernel.device) for name, tensor in tensors.items()}
        if self.disk is None:
            return decomposition.basis_from_tensors(tensors)
        key = self._key(info, decomposition, kernel)
        self.disk.save("bases", key, tensors)
        return self._read(decomposition, key, kernel.device)

    def _read(self, decomposition: Decomposition, key: str, device: torch.device) -> Any:
        """A stored basis on ``device``; in low-memory mode its vectors stay on disk and are read on access."""
        if not self.low_memory:
            tensors = self.disk.load("bases", key)
            return None if tensors is None else decomposition.basis_from_tensors(
                {name: tensor.to(device) for name, tensor in tensors.items()})
        names = self.disk.names("bases", key)
        small = None if names is None else [n for n in names if n.rsplit(".", 1)[-1] in _SMALL_TENSORS or n == "kernel"]
        tensors = None if small is None else self.disk.load("bases", key, small)
        if tensors is None:
            return None
        read = self.disk.reader("bases", key)
        return decomposition.basis_from_tensors({name: tensor.to(device) for name, tensor in tensors.items()},
                                                lambda name: read(name).to(device))

    def _count_randomized(self, basis: Any) -> None:
        """Count a partial spectrum read from the cache as randomized, with its recorded residual."""
        if getattr(basis, "complete", True):
            return
        self.randomized += 1
        self.worst_residual = max(self.worst_residual, basis.residual)

    def _compute(self, info: LayerInfo, decomposition: Decomposition, kernel: torch.Tensor,
                 leading: int | None) -> Any:
        self.computed += 1
        if decomposition.needs_inputs:
            return decomposition.basis_from_inputs(kernel, self._gram(info, decomposition).to(kernel.device))
        if leading is None:
            return decomposition.basis(kernel)
        try:
            basis = decomposition.basis(kernel, leading)
        except RandomizedSVDError:
            self.fallbacks += 1
            return decomposition.basis(kernel)
        self._count_randomized(basis)
        return basis

    def describe(self) -> dict[str, Any]:
        """For the report: bases computed, read from the cache, randomized (worst residual / σ₁) and fallen back."""
        return {"computed": self.computed, "cache_hits": self.cache_hits, "randomized": self.randomized,
                "randomized_fallbacks": self.fallbacks, "randomized_worst_residual": self.worst_residual,
                "low_memory": self.low_memory}
