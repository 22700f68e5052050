"""The latency guard: layers whose factors are not faster than the dense layer stay dense, and say why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankcut
from rankcut.cli import main
from rankcut.latency import LatencyGuard, median_seconds
from rankcut.layers import Factorized

DENSE_SECONDS = 1.0
FASTEST = 9  # the fake factors are faster than the dense layer below rank 10


class FakeTimer:
    """Dense layers take 1 s; factors of rank r take r/10 s. Counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: torch.Tensor) -> float:
        self.calls += 1
        return module.rank / 10 if isinstance(module, Factorized) else DENSE_SECONDS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def test_guard_keeps_dense_the_ranks_above_the_fastest_and_explains() -> None:
    timer = FakeTimer()
    plan = rankcut.make_plan(_model(), "rank:20", example_inputs=torch.randn(4, 64),
                             latency_guard=LatencyGuard(timer))
    assert [layer.rank for layer in plan.layers] == [None, None, None]
    assert "above 9, the largest rank measured faster" in plan.layers[0].reason
    assert "input 4x64" in plan.layers[0].reason
    # the three layers share one shape, hence one bisection over the 31 paying ranks: 1 dense + ≤ 6 factor timings
    assert timer.calls <= 7
    assert plan.meta["latency_guard"] is True
    below = rankcut.make_plan(_model(), f"rank:{FASTEST}", example_inputs=torch.randn(4, 64),
                              latency_guard=LatencyGuard(FakeTimer()))
    assert [layer.rank for layer in below.layers] == [FASTEST] * 3


def test_budget_only_spends_on_ranks_the_guard_allows() -> None:
    plan = rankcut.make_plan(_model(), "budget:params=0.3", example_inputs=torch.randn(4, 64),
                             latency_guard=LatencyGuard(FakeTimer()))
    assert all(layer.rank is None or layer.rank <= FASTEST for layer in plan.layers)
    dense = [layer for layer in plan.layers if layer.rank is None]
    assert all("latency guard: ranks up to 9 measured faster" in layer.reason for layer in dense)
    kept = sum(layer.params_after for layer in plan.layers) / sum(layer.params_before for layer in plan.layers)
    assert kept <= 0.3


def test_guard_reports_layers_where_no_rank_is_faster() -> None:
    class SlowFactors(FakeTimer):
        def __call__(self, module: nn.Module, inputs: torch.Tensor) -> float:
            return 2.0 if isinstance(module, Factorized) else DENSE_SECONDS

    plan = rankcut.make_plan(_model(), "fixed:0.3", example_inputs=torch.randn(4, 64),
                             latency_guard=LatencyGuard(SlowFactors()))
    assert all(layer.rank is None and "no rank is faster" in layer.reason for layer in plan.layers)


def test_guard_needs_example_inputs() -> None:
    with pytest.raises(ValueError, match="pass example_inputs"):
        rankcut.make_plan(_model(), "fixed:0.5", latency_guard=True)
    with pytest.raises(ValueError, match="pass example_inputs"):
        rankcut.compress(_model(), "fixed:0.5", latency_guard=True)


def test_real_timings_make_a_valid_plan_for_every_layer_type() -> None:
    from toy_models import cnn_factory, cnn_inputs

    model = cnn_factory()
    compressed, report = rankcut.compress(model, "fixed:0.5", example_inputs=cnn_inputs(), decomposition="auto",
                                          latency_guard=True, progress=False)
    assert compressed(cnn_inputs()).shape == model(cnn_inputs()).shape
    for layer in report.plan.layers:
        assert layer.rank is not None or not layer.supported or "dense" in layer.reason
    assert median_seconds(nn.Linear(8, 8), torch.randn(2, 8), repeats=3) > 0


def test_cli_latency_guard_flag(tmp_path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["compress", "toy_models:cnn_factory", "--input-shape", "2,3,16,16",
                                       "--select", "fixed:0.5", "--latency-guard", "--no-progress",
                                       "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert rankcut.checkpoint.read_plan(tmp_path / "out").meta["latency_guard"] is True
