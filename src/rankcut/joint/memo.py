"""Loss statistics and probe measurements kept in the disk cache, so a second run (another budget) reuses them.

The key hashes every tensor of the model's state, every calibration batch and the selector's settings:
anything that could change a statistic or a probe changes the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankcut.cache import DiskCache, digest
from rankcut.joint.statistics import ComponentStats

KIND = "loss-statistics"


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a batch (tensors, tuples, lists and mappings, e.g. tokenizer output)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _tensors_in(value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def statistics_key(model: nn.Module, names: Sequence[str], batches: Sequence[Any], settings: str) -> str:
    """The cache key of one model's statistics on these batches with these selector settings."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    tensors += [t for batch in batches for t in _tensors_in(batch)]
    return digest(tensors, settings, *names)


def load(disk: DiskCache, key: str) -> tuple[dict[str, ComponentStats], dict[str, dict[int, float]]] | None:
    """Cached statistics and probe measurements by layer name, or None."""
    tensors = disk.load(KIND, key)
    if tensors is None:
        return None
    stats = {name[2:]: ComponentStats(name[2:], a) for name, a in tensors.items() if name.startswith("a:")}
    probes = {name[7:]: {int(k): float(v) for k, v in table.tolist()}
              for name, table in tensors.items() if name.startswith("probes:")}
    return stats, probes


def save(disk: DiskCache, key: str, stats: Mapping[str, ComponentStats],
         probes: Mapping[str, Mapping[int, float]]) -> None:
    """Store statistics and probe measurements (removed components → measured loss change) by layer name."""
    tensors = {f"a:{name}": s.a for name, s in stats.items()}
    tensors.update({f"probes:{name}": torch.tensor(sorted(table.items()), dtype=torch.float64).reshape(-1, 2)
                    for name, table in probes.items()})
    disk.save(KIND, key, tensors)
