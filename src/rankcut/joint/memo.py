"""Loss statistics and probe measurements kept in the disk cache, so a second run (another budget) reuses them.

The key hashes every tensor of the model's state, every calibration batch (tensors, arrays and any other
values) and the selector's settings. The loss function cannot be hashed, so an entry also records the
calibration loss it was measured at, and is used only when this run measures the same loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rankcut.cache import DiskCache, digest
from rankcut.inventory import Candidate
from rankcut.joint.statistics import ComponentStats
from rankcut.layers import Rank

KIND = "loss-statistics"


def _leaves(value: Any) -> Iterator[torch.Tensor | str]:
    """Every leaf of a batch: tensors (numpy arrays as tensors) and the text of any other value."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, np.ndarray):
        yield torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield str(key)
            yield from _leaves(value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    else:
        yield repr(value)


def statistics_key(model: nn.Module, candidates: Sequence[Candidate], batches: Sequence[Any], settings: str) -> str:
    """The cache key of one model's statistics on these batches with these selector settings.

    The statistics are taken in each layer's basis, so the key holds what the basis is made from besides the
    weights: the layer's decomposition and, for one that whitens by the inputs, its inputs' Gram matrix."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    leaves = [leaf for batch in batches for leaf in _leaves(batch)]
    tensors += [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    tensors += [c.store.input_grams[c.name] for c in candidates if c.decomposition.needs_inputs]
    layers = [f"{c.name}={c.decomposition.name}" for c in candidates]
    return digest(tensors, settings, *layers, *(leaf for leaf in leaves if isinstance(leaf, str)))


def load(disk: DiskCache, key: str, baseline: float, paths: Mapping[str, tuple[Rank, ...]]
         ) -> tuple[dict[str, ComponentStats], dict[str, dict[int, float]]] | None:
    """Cached statistics and probe measurements by layer name, or None (also when the entry was measured at
    another calibration loss than ``baseline``: another loss function). ``paths``: the tucker2 layers' rank
    paths, which are part of the key."""
    tensors = disk.load(KIND, key)
    if tensors is None or "baseline" not in tensors:
        return None
    if abs(float(tensors["baseline"]) - baseline) > 1e-6 * max(abs(baseline), 1e-12):
        return None
    stats = {name[2:]: ComponentStats(name[2:], a, paths.get(name[2:]))
             for name, a in tensors.items() if name.startswith("a:")}
    probes = {name[7:]: {int(k): float(v) for k, v in table.tolist()}
              for name, table in tensors.items() if name.startswith("probes:")}
    return stats, probes


def save(disk: DiskCache, key: str, stats: Mapping[str, ComponentStats],
         probes: Mapping[str, Mapping[int, float]], baseline: float) -> None:
    """Store statistics and probe measurements (removed components → measured loss change) by layer name,
    with the calibration loss they were measured at."""
    tensors = {f"a:{name}": s.a for name, s in stats.items()}
    tensors["baseline"] = torch.tensor(baseline, dtype=torch.float64)
    tensors.update({f"probes:{name}": torch.tensor(sorted(table.items()), dtype=torch.float64).reshape(-1, 2)
                    for name, table in probes.items()})
    disk.save(KIND, key, tensors)
