"""Data-aware (whitened) SVD: the closed form of its output error, input patches as the conv sees them, full
rank exact through the whole-model API, save → load, and clear errors when the inputs are missing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import rankcut
from rankcut.input_statistics import conv_patches, input_grams
from rankcut.inventory import scan
from rankcut.layers import describe_layer
from rankcut.linalg import Spectrum
from test_full_rank_exact import conv_layers

from toy_models import ToyTask


def _inputs_and_matrix(m: int = 6, n: int = 9, samples: int = 40):
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = mixing @ torch.randn(n, samples, generator=g, dtype=torch.float64)  # correlated, uneven inputs
    return X, torch.randn(m, n, generator=g, dtype=torch.float64)


def test_whitened_truncation_loses_exactly_the_dropped_values_of_output():
    X, M = _inputs_and_matrix()
    spectrum = Spectrum.whitened(M, X @ X.T, ridge=0.0)
    torch.testing.assert_close(spectrum.reconstruct(range(spectrum.max_rank))[0], M, rtol=1e-9, atol=1e-9)
    for rank in range(1, spectrum.max_rank):
        A, B = spectrum.factors(rank)
        output_error = ((M - A[0] @ B[0]) @ X).pow(2).sum()
        assert float(output_error) == pytest.approx(float(spectrum.S[0, rank:].pow(2).sum()), rel=1e-8)
        relative = float(output_error.sqrt() / (M @ X).norm())
        assert spectrum.relative_error(rank) == pytest.approx(relative, rel=1e-8)


def test_whitened_truncation_beats_plain_truncation_on_its_inputs():
    X, M = _inputs_and_matrix()
    whitened, plain = Spectrum.whitened(M, X @ X.T, ridge=0.0), Spectrum.of(M)
    for rank in range(1, plain.max_rank):
        errors = [float(((M - a[0] @ b[0]) @ X).norm()) for a, b in (s.factors(rank) for s in (whitened, plain))]
        assert errors[0] <= errors[1] * (1 + 1e-9)


def test_whitening_refuses_a_wrong_shape_and_a_singular_gram_without_ridge():
    X, M = _inputs_and_matrix()
    with pytest.raises(ValueError, match="Gram matrix must be"):
        Spectrum.whitened(M, (X @ X.T)[:4, :4])
    singular = X[:, :3] @ X[:, :3].T  # rank 3 < 9 columns
    with pytest.raises(ValueError, match="not positive definite"):
        Spectrum.whitened(M, singular, ridge=0.0)
    assert torch.isfinite(Spectrum.whitened(M, singular).S).all()  # the default ridge makes it usable


@settings(max_examples=60, deadline=None)
@given(layer=conv_layers())
def test_conv_patches_are_the_columns_the_weight_multiplies(layer):
    conv, x = layer
    if conv.weight.dim() == 5:
        return  # 3-D convs are not whitened (the layer says so)
    info = describe_layer("conv", conv)
    patches = conv_patches(conv, info, x)  # (positions, g, in/g·k)
    weight = conv.weight.reshape(info.groups, info.out_per_group, -1)
    through_patches = torch.einsum("pgc,gtc->pgt", patches, weight).reshape(patches.shape[0], -1)
    output = conv(x) - (conv.bias.reshape(1, -1, *([1] * info.spatial_dims)) if conv.bias is not None else 0)
    expected = output.flatten(2).transpose(1, 2).reshape(-1, info.out_channels)
    torch.testing.assert_close(through_patches, expected, rtol=1e-10, atol=1e-10)


def test_full_rank_whitened_model_is_exact_and_saves_and_loads(tmp_path):
    task = ToyTask()
    model = task.build_model()
    compressed, report = rankcut.compress(model, "full", task=task, decomposition="whitened-svd", progress=False)
    assert {layer.decomposition for layer in report.plan.factorized()} == {"whitened-svd"}
    with torch.no_grad():
        torch.testing.assert_close(compressed(task.images), model(task.images), rtol=1e-4, atol=1e-5)
    rankcut.save(compressed, tmp_path / "out")
    loaded = rankcut.load(tmp_path / "out", task.build_model())
    with torch.no_grad():
        assert torch.equal(loaded(task.images), compressed(task.images))


def test_whitened_plan_applies_again_with_its_task_only():
    task = ToyTask()
    model = task.build_model()
    compressed, report = rankcut.compress(model, "fixed:0.5", task=task, decomposition="whitened-svd",
                                          progress=False)
    with pytest.raises(ValueError, match=r"^whitened-svd \(layer .*\) whitens each layer by its calibration inputs"):
        rankcut.apply(model, report.plan)
    again = rankcut.apply(model, report.plan, task=task)
    with torch.no_grad():
        assert torch.equal(again(task.images), compressed(task.images))


def test_whitened_svd_needs_a_task():
    model = ToyTask().build_model()
    with pytest.raises(ValueError, match="pass a task"):
        rankcut.compress(model, "fixed:0.5", decomposition="whitened-svd", progress=False)


def test_a_layer_that_never_runs_cannot_be_whitened():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    candidates = scan(model, decomposition="whitened-svd").factorizable()
    with pytest.raises(ValueError, match="'spare' never ran"):
        input_grams(model, candidates, [torch.randn(3, 4)], lambda m, x: m(x))


def test_three_dimensional_convs_are_left_to_plain_svd():
    conv = nn.Conv3d(2, 4, 3)
    reason = rankcut.layers.get_decomposition("whitened-svd").unsupported_reason(describe_layer("c", conv))
    assert reason is not None and "use svd" in reason
