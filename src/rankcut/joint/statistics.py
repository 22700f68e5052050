"""Per-component loss statistics of every layer, from one forward and one backward pass over calibration data.

For a layer ``W = Σ_g Σ_i σ_gi u_gi v_giᵀ`` (one SVD per conv group), the directional derivative of a sample's
loss along component i is ``a_si = Σ_g σ_gi u_giᵀ (∂ℓ_s/∂W_g) v_gi``. It is gathered with hooks without ever
forming ∂L/∂W: inputs are projected on the right singular vectors (for a conv, the vectors are k×k filters),
output gradients on the left ones, and their product is summed over positions (tokens or pixels).
Dropping a set D of components then changes the loss by about ``-Σ_{i∈D} mean_s a_si`` (first order) plus
``½ mean_s (Σ_{i∈D} a_si)²`` (second order, empirical Fisher) — for every D, from these numbers alone.

A tucker2 layer is gathered the same way in the bases of its two unfoldings: per sample, block (j, l) of
``⟨∂ℓ_s/∂K, K⟩`` split by output component j and input component l, then summed over every leading block
(2-D prefix sums) to give the derivative along each step of the layer's rank path at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.inventory import Candidate
from rankcut.layers import Rank
from rankcut.layers.info import padded_like
from rankcut.linalg import Spectrum, TuckerBasis
from rankcut.tasks.base import batch_loss

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_CONVS = (F.conv1d, F.conv2d, F.conv3d)  # by spatial dimensions


@dataclass(frozen=True)
class ComponentStats:
    """One layer's per-sample loss derivatives along its components: ``a`` has shape (samples, components).

    svd: component i is the singular triplet i. tucker2: ``path`` lists the rank pairs from the full one down,
    and removing the last k components (n−1 … n−k) is the step to ``path[k]``; component 0 is what is left.
    """

    name: str
    a: torch.Tensor  # float64, (S, n): a_si = σ_i · u_iᵀ (∂ℓ_s/∂W) v_i, summed over groups
    path: tuple[Rank, ...] | None = None

    @property
    def gradient(self) -> torch.Tensor:
        """Mean over samples of ``a``: minus the first-order loss change of dropping each component."""
        return self.a.mean(0)

    def predicted_change(self, dropped: Sequence[int]) -> float:
        """Second-order Taylor estimate of the loss change when ``dropped`` components are removed."""
        if not dropped:
            return 0.0
        direction = self.a[:, torch.tensor(list(dropped), dtype=torch.long)].sum(1)
        return float(-direction.mean() + 0.5 * (direction**2).mean())


class _PerSampleRows:
    """One layer's per-sample rows of ``a``. The calls within one batch are summed (a layer may run several
    times per forward pass: its samples' derivatives add up), then kept as that batch's rows."""

    path: tuple[Rank, ...] | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.chunks: list[torch.Tensor] = []
        self._current: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        if self._current is None:
            self._current = rows
        elif self._current.shape != rows.shape:
            raise ValueError(f"layer {self.name!r} ran on inputs with different batch sizes in one forward pass; the "
                             "loss statistics need the samples on the first dimension of every call")
        else:
            self._current = self._current + rows

    def end_batch(self) -> None:
        if self._current is not None:
            self.chunks.append(self._current.cpu())  # the curves and the allocation work on the CPU
            self._current = None

    def result(self) -> ComponentStats | None:
        """The layer's statistics, or None when the loss never depended on it."""
        return ComponentStats(self.name, torch.cat(self.chunks), self.path) if self.chunks else None


class _Projector(_PerSampleRows):
    """Projects one svd layer's inputs and output gradients on its singular vectors and accumulates ``a``."""

    def __init__(self, candidate: Candidate, spectrum: Spectrum) -> None:
        super().__init__(candidate.name)
        info = candidate.info
        self.info, self.module = info, candidate.module
        self.groups, self.rank = spectrum.U.shape[0], spectrum.max_rank
        dtype = info.dtype
        self.left = spectrum.U.to(device=info.device, dtype=dtype)  # (g, m, n)
        # Right vectors as a weight that maps inputs to (g·n) projections: Linear weight or grouped conv filters.
        right = spectrum.Vh.to(device=info.device, dtype=dtype)
        self.right = right.reshape(self.groups * self.rank, info.in_per_group, *info.kernel_size)
        self.sigma = spectrum.S.to(device=info.device, dtype=torch.float64)  # (g, n)

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Vᵀ x`` at every output position: (B, g, n, positions)."""
        info = self.info
        x = x.to(self.right.dtype)  # under the user's autocast the layer may have run in half precision
        if not info.is_conv:
            projected = x @ self.right.reshape(self.rank, -1).T  # (B, ..., n)
            return projected.reshape(x.shape[0], -1, 1, self.rank).permute(0, 2, 3, 1)
        # the layer's own conv (stride, padding incl. "same", dilation, padding_mode, groups) with our filters
        projected = _conv_as(self.module, x, self.right, self.groups)
        return projected.reshape(x.shape[0], self.groups, self.rank, -1)

    def project_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``Uᵀ g`` at every output position: (B, g, n, positions)."""
        batch, grad = grad.shape[0], grad.to(self.left.dtype)
        if not self.info.is_conv:
            projected = grad @ self.left[0]  # (B, ..., n)
            return projected.reshape(batch, -1, 1, self.rank).permute(0, 2, 3, 1)
        grad = grad.reshape(batch, self.groups, self.info.out_per_group, -1)
        return torch.einsum("bgmp,gmn->bgnp", grad, self.left)

    def accumulate(self, x_projected: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one call's per-sample derivatives; the loss is a batch mean, so each sample's share is ×B."""
        g_projected = self.project_gradient(grad)
        per_sample = (x_projected * g_projected).sum(-1).to(torch.float64)  # (B, g, n)
        self.add((per_sample * self.sigma).sum(1) * x_projected.shape[0])


def _conv_as(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``module``'s convolution (stride, padding incl. its mode, dilation) with another weight and group count."""
    x, padding = padded_like(module, x)
    return _CONVS[weight.dim() - 3](x, weight, None, module.stride, padding, module.dilation, groups)


class _TuckerProjector(_PerSampleRows):
    """Accumulates a tucker2 layer's per-sample loss derivative along every step of its rank path.

    With ``x̃ = U_inᵀ x`` (a 1×1 conv) and ``g̃ = U_outᵀ g``, block (j, l) of ``⟨∂ℓ_s/∂K, K⟩`` in the unfoldings'
    bases is ``Σ_pos g̃_j · (K̃_jl ∗ x̃_l)``: one depthwise conv of x̃ with the rotated kernel K̃, in chunks of j.
    """

    chunk_elements = 1 << 24  # floats per chunk of the depthwise conv's output

    def __init__(self, candidate: Candidate, basis: TuckerBasis, path: Sequence[Rank]) -> None:
        super().__init__(candidate.name)
        info = candidate.info
        self.info, self.module = info, candidate.module
        options = {"device": info.device, "dtype": info.dtype}
        U_out, U_in = basis.out_spectrum.U, basis.in_spectrum.U  # (g, T/g, R_out), (g, S/g, R_in)
        self.groups, self.r_out, self.r_in = U_out.shape[0], U_out.shape[2], U_in.shape[2]
        pointwise = (1,) * info.spatial_dims
        self.to_inner = U_in.transpose(1, 2).reshape(-1, info.in_per_group, *pointwise).to(**options)
        self.blocks = basis.rotated().transpose(1, 2).to(**options)  # (g, R_in, R_out, *k): block (l, j)
        self.left = U_out.to(**options)
        self.path = tuple(path)
        self.path_out = torch.tensor([r_out - 1 for r_out, _ in self.path])
        self.path_in = torch.tensor([r_in - 1 for _, r_in in self.path])

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """``U_inᵀ x`` at every input position (the padding commutes with this per-pixel projection)."""
        return _CONVS[self.info.spatial_dims - 1](x.to(self.to_inner.dtype), self.to_inner, groups=self.groups)

    def accumulate(self, x_inner: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one call's per-sample derivatives along the path (×B: the loss is a batch mean)."""
        batch, g, grad = grad.shape[0], self.groups, grad.to(self.left.dtype)
        g_inner = torch.einsum("bgmp,gmn->bgnp", grad.reshape(batch, g, self.info.out_per_group, -1), self.left)
        blocks = torch.zeros(batch, self.r_out, self.r_in, dtype=torch.float64, device=grad.device)
        step = max(1, self.chunk_elements // (batch * g * self.r_in * g_inner.shape[-1]))
        kernel_size = self.blocks.shape[3:]
        for start in range(0, self.r_out, step):
            stop = min(self.r_out, start + step)
            weight = self.blocks[:, :, start:stop].reshape(-1, 1, *kernel_size)
            z = _conv_as(self.module, x_inner, weight, g * self.r_in).reshape(batch, g, self.r_in, stop - start, -1)
            blocks[:, start:stop] = torch.einsum("bgljp,bgjp->bjl", z, g_inner[:, :, start:stop]).to(torch.float64)
        prefix = blocks.cumsum(1).cumsum(2) * batch
        total = prefix[:, -1, -1:]
        removed = total - prefix[:, self.path_out, self.path_in]  # (B, n): ⟨g, K − K_path[k]⟩
        steps = torch.diff(torch.cat([removed, total], 1), dim=1)  # step k: path[k] → path[k+1] (then to 0)
        self.add(steps.flip(1))


def gather_statistics(model: nn.Module, candidates: Sequence[Candidate], batches: Iterable[Any], loss: LossFn,
                      progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
                      paths: Mapping[str, Sequence[Rank]] | None = None,
                      losses: list[float] | None = None) -> dict[str, ComponentStats]:
    """``ComponentStats`` of every candidate, from one forward and backward pass per batch.

    ``paths`` gives each tucker2 layer its rank pairs, from the full pair down (svd layers need none).
    ``losses``, when given, receives each batch's loss (a probe of the same batches need not measure it again).
    Layers the loss does not depend on (never called, or not on the path to the loss) are left out.
    The model's parameters and their ``.grad`` are left untouched: gradients are taken with respect to the
    layers' outputs only. Batches must put samples on the first dimension of every layer's input.
    """
    projectors = {c.name: _projector(c, (paths or {}).get(c.name)) for c in candidates}
    pending: list[tuple[_Projector, torch.Tensor, torch.Tensor]] = []

    def hook(projector: _Projector):
        def record(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if output.requires_grad:  # projected in the projector's precision, even under the user's autocast
                x = inputs[0].detach()
                with torch.no_grad(), _without_autocast(x.device):
                    pending.append((projector, projector.project_input(x), output))
        return record

    handles = [c.module.register_forward_hook(hook(projectors[c.name])) for c in candidates]
    was_training = model.training
    frozen = [c.module.weight for c in candidates if not c.module.weight.requires_grad]
    model.eval()
    try:
        for weight in frozen:  # outputs must carry gradients even when the user froze the model
            weight.requires_grad_(True)
        for batch in progress(batches):
            pending.clear()
            with torch.enable_grad():
                value = batch_loss(loss, model, batch)
                if not torch.isfinite(value):
                    raise ValueError(f"calibration loss is {float(value.detach())}; the model or the data is broken")
                if losses is not None:
                    losses.append(float(value.detach()))
                outputs = [output for _, _, output in pending]
                grads = torch.autograd.grad(value, outputs, allow_unused=True)
            with torch.no_grad(), _without_autocast(value.device):
                for (projector, x_projected, _), grad in zip(pending, grads, strict=True):
                    if grad is not None:
                        projector.accumulate(x_projected, grad)
                for projector in projectors.values():
                    projector.end_batch()
    finally:
        pending.clear()
        for handle in handles:
            handle.remove()
        for weight in frozen:
            weight.requires_grad_(False)
        model.train(was_training)
    results = {name: projector.result() for name, projector in projectors.items()}
    return {name: stats for name, stats in results.items() if stats is not None}


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")  # where torch.autocast can be switched off


def _without_autocast(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast switched off on ``device`` (a user's loss may run under it): projections keep the layer's
    precision. Nothing to switch off on a device type autocast does not know."""
    return torch.autocast(device.type, enabled=False) if device.type in _AUTOCAST_DEVICES else nullcontext()


def _projector(candidate: Candidate, path: Sequence[Rank] | None) -> _Projector | _TuckerProjector:
    basis = candidate.basis()
    if isinstance(basis, Spectrum):
        return _Projector(candidate, basis)
    full = candidate.decomposition.max_rank(candidate.info)
    if not path or tuple(path[0]) != full:
        raise ValueError(f"layer {candidate.name!r}: tucker2 statistics need its rank path, starting at {full}")
    return _TuckerProjector(candidate, basis, path)
