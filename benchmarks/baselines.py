"""Baselines users would otherwise pick, built at a given share of factorizable params kept.

- activation-aware SVD (ASVD-style): scale each input channel by (mean |x|)^½ from calibration data before the
  SVD, undo the scale on the first factor; same uniform ranks as plain truncated SVD;
- TensorLy-Torch Tucker (``tltorch.FactorizedConv.from_conv``, spatial modes kept full so that it is the same
  Tucker-2 family as ours) on the convs, plain SVD on the linears.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import rankcut
from rankcut.api import _set_module
from rankcut.inventory import scan
from rankcut.layers import describe_layer, get_decomposition
from rankcut.layers.info import bias_of, kernel_of
from rankcut.linalg import Spectrum
from rankcut.tasks import Task


def input_channel_scales(model: nn.Module, task: Task, names: list[str], samples: int = 256,
                         batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of each named layer over the task's calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, channel_dim: int):
        def record(_module, inputs, _output):
            x = inputs[0].detach().abs().double()
            x = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = []
    for name in names:
        module = model.get_submodule(name)
        channel_dim = 1 if describe_layer(name, module).is_conv else -1
        handles.append(module.register_forward_hook(hook(name, channel_dim)))
    try:
        with torch.no_grad():
            for batch in task.calibration_batches(samples, batch_size):
                task.loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def asvd(model: nn.Module, task: Task, fraction: float, alpha: float = 0.5) -> nn.Module:
    """Uniform-ratio SVD of W·diag(s) with s = (mean |x|)^alpha, the scale folded back into the first factor."""
    plan = rankcut.make_plan(model, f"fixed:{fraction}")
    names = [layer.name for layer in plan.factorized()]
    scales = input_channel_scales(model, task, names)
    compressed = copy.deepcopy(model)
    svd = get_decomposition("svd")
    for layer in plan.factorized():
        module = compressed.get_submodule(layer.name)
        info = describe_layer(layer.name, module)
        scale = scales[layer.name].clamp(min=1e-6) ** alpha  # per input channel
        kernel = kernel_of(module, info)  # (g, T/g, S/g, *k)
        per_group = scale.reshape(info.groups, 1, info.in_per_group, *([1] * info.spatial_dims))
        spectrum = Spectrum.of((kernel * per_group).reshape(info.groups, info.out_per_group, -1))
        factors = svd.build(info, layer.rank, spectrum, bias_of(module))
        with torch.no_grad():
            first = factors[0].weight.view(info.groups, layer.rank, info.in_per_group, *info.kernel_size)
            first.div_(per_group.to(first.dtype))
        _set_module(compressed, layer.name, factors)
    return compressed


def _tltorch_convs(model: nn.Module, rank: float, decompose: bool) -> tuple[nn.Module, list[str]]:
    """A copy with tltorch Tucker in place of each k×k ungrouped conv (weights decomposed only if asked)."""
    import tltorch

    compressed = copy.deepcopy(model)
    skipped = []
    for candidate in scan(compressed).factorizable():
        if not candidate.info.is_conv:
            continue
        if candidate.info.groups > 1 or candidate.info.kernel_volume == 1:
            skipped.append(candidate.name)  # tltorch has no groups; a 1x1 conv has no spatial mode
            continue
        module = compressed.get_submodule(candidate.name)
        factorized = tltorch.FactorizedConv.from_conv(
            module, rank=rank, factorization="tucker", fixed_rank_modes="spatial", decompose_weights=decompose,
            implementation="factorized")
        _set_module(compressed, candidate.name, factorized)
    return compressed, skipped


def tltorch_tucker(model: nn.Module, fraction: float, names: set[str]) -> tuple[nn.Module, str]:
    """TensorLy-Torch Tucker on the convs and plain SVD on the linears, keeping ``fraction`` of the params of
    the layers in ``names``. tltorch's ``rank=`` is matched to the budget by bisection on parameter counts
    (cheap: no decomposition), then the weights are decomposed once."""
    convs = [c.name for c in scan(model).candidates if c.info.is_conv]
    total = sum(p.numel() for name in names for p in model.get_submodule(name).parameters())
    # linears first: tltorch modules do not survive the deep copy that compress makes
    linears_done, _ = rankcut.compress(model, f"fixed:{fraction}", ignore=convs, progress=False)

    def build(rank: float, decompose: bool) -> tuple[nn.Module, list[str]]:
        return _tltorch_convs(linears_done, rank, decompose)

    def kept(rank: float) -> float:
        compressed, _ = build(rank, decompose=False)
        modules = dict(compressed.named_modules())
        return sum(p.numel() for name in names for p in modules[name].parameters()) / total

    low, high = 0.01, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) <= fraction else (low, middle)
    compressed, skipped = build(low, decompose=True)
    note = f"; {len(skipped)} grouped/1x1 convs left dense (tltorch cannot factorize them)" if skipped else ""
    return compressed.eval(), f"tltorch tucker rank={low:.3f} on k×k convs, svd fixed:{fraction} on linears{note}"
