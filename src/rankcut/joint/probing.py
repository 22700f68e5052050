"""Real loss measurements of partly factorized models, by swapping in low-rank weights without module surgery.

A layer whose weight is replaced by the product of its kept components (``Σ_{i∈K} σ_i u_i v_iᵀ`` for svd, the
projection on the kept channel components for tucker2) computes exactly what its factorized form computes
(up to float rounding), so measuring a plan needs no copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from rankcut.distributed import Group
from rankcut.inventory import Candidate
from rankcut.joint.statistics import LossFn
from rankcut.layers import Components, Fit
from rankcut.tasks.base import batch_loss, batch_samples


def low_rank_weight(candidate: Candidate, kept: Components | Fit) -> torch.Tensor:
    """The layer's weight rebuilt from its ``kept`` components (or its ``Fit``), in the module's layout and dtype."""
    info = candidate.info
    matrices = candidate.decomposition.reconstruct(candidate.basis(), kept)
    kernel = matrices.reshape(info.out_channels, info.in_per_group, *info.kernel_size)
    if info.kind == "hf_conv1d":
        kernel = kernel.t()
    return kernel.to(candidate.module.weight)  # its dtype and device


@contextmanager
def substituted(candidates: Mapping[str, Candidate], kept: Mapping[str, Components | Fit]) -> Iterator[None]:
    """Within the block, each named layer's weight keeps only its ``kept`` components (or is its ``Fit``);
    restored afterwards."""
    originals = {}
    try:
        for name, components in kept.items():
            module = candidates[name].module
            originals[name] = module.weight.data
            module.weight.data = low_rank_weight(candidates[name], components)
        yield
    finally:
        for name, weight in originals.items():
            candidates[name].module.weight.data = weight


def spread_batches(batches: Sequence[Any], samples: int) -> list[Any]:
    """The fewest batches, at evenly spaced positions of ``batches`` (centred), that hold ``samples`` samples
    (counted in the batches: a user's loader has its own batch size), or all of them.

    A loader may order its batches (the WordNet task sorts glosses by length to pad less); a prefix would
    then measure only the shortest ones, while the Taylor predictions the probes are compared with average
    over all calibration batches.
    """
    sizes = [batch_samples(batch) for batch in batches]
    count = min(len(batches), max(1, -(-samples // max(max(sizes), 1))))  # a full batch each: the least count
    while True:
        picks = [int((index + 0.5) * len(batches) / count) for index in range(count)]
        if count == len(batches) or sum(sizes[pick] for pick in picks) >= samples:
            return [batches[pick] for pick in picks]
        count += 1


def truncation_key(kept: Mapping[str, Components | Fit]) -> tuple[Any, ...] | None:
    """A hashable name for a truncation (which components each layer keeps), or None when a layer is a ``Fit``."""
    if not all(isinstance(part, tuple) for part in kept.values()):
        return None
    return tuple(sorted(kept.items()))


def mean_loss(local: Sequence[float], group: Group) -> float:
    """The mean of per-batch losses, each process holding those of its share of the batches."""
    values = group.gather_rows(torch.tensor(list(local), dtype=torch.float64)).tolist()
    return sum(values) / len(values)


class LossProbe:
    """Mean loss over a fixed list of calibration batches, and its change when layers are truncated.

    ``baseline``: the model's mean loss on these batches when it is already known (a statistics pass over the
    same batches computes it, with gradients on: bitwise the same on the reference models, about 2e-8
    relative apart where a layer has a path of its own without gradients, as ``nn.MultiheadAttention`` has);
    measured otherwise.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], loss: LossFn, group: Group | None = None,
                 baseline: float | None = None) -> None:
        self.model, self.batches, self.loss = model, list(batches), loss
        self.group = group or Group.current()
        self.measurements = 0
        self._changes: dict[tuple[Any, ...], float] = {}  # finite changes measured without ``within``
        self.baseline = self.measure(original=True) if baseline is None else baseline

    def measure(self, original: bool = False) -> float:
        """The current model's mean loss on the probe batches (forward passes only; split across processes).

        A non-finite loss is returned (``change`` decides what it means), except for the ``original`` model's,
        which raises: every change is measured against it.
        """
        self.model.eval()
        with torch.no_grad():
            local = [float(batch_loss(self.loss, self.model, batch)) for batch in self.group.share(self.batches)]
        value = mean_loss(local, self.group)
        self.measurements += 1
        if original and not math.isfinite(value):
            raise ValueError(f"the original model's loss on the probe batches is {value}: check the model and "
                             "the calibration data (an empty batch gives nan)")
        return value

    def remember(self, kept: Mapping[str, Components], change: float) -> None:
        """Take ``change`` as the measurement of this truncation (an earlier run's, from the cache): ``change``
        returns it instead of measuring. A run with a cache hit then takes the same path as one without, only
        faster."""
        key = truncation_key(kept)
        if key is not None and math.isfinite(change):
            self._changes[key] = change

    def change(self, candidates: Mapping[str, Candidate], kept: Mapping[str, Components | Fit], strict: bool = True,
               within: AbstractContextManager[Any] | None = None) -> float:
        """Measured loss change when the named layers keep only the given components (see ``measure``);
        ``within``: a context entered after the substitution, e.g. batch-norm recalibration of the result.
        A non-finite loss raises, naming the truncated layers; with ``strict=False`` it is returned (a search
        then counts it as a failed step).

        Without ``within``, a truncation measured before is not measured again: the same weights on the same
        batches give the same number (compact's search has measured the plan it keeps, for instance). The
        model must be the one the probe was made with, as it is whenever ``change`` is called.
        """
        key = truncation_key(kept) if within is None else None
        if key is not None and key in self._changes:
            return self._changes[key]
        with substituted(candidates, kept), within or nullcontext():
            change = self.measure() - self.baseline
        if strict and not math.isfinite(change):
            names = sorted(kept)
            raise ValueError(f"probe loss is {change + self.baseline} with {len(names)} layer(s) truncated "
                             f"({', '.join(map(repr, names[:5]))}{' …' if len(names) > 5 else ''}): the truncation "
                             "broke the model's numerics; keep such layers dense (ignore=[...], --ignore) or run "
                             "the model in float32")
        if key is not None and math.isfinite(change):
            self._changes[key] = change
        return change
