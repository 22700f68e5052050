"""Energy, EVBMF and budget selectors: targets hit, break-even respected, reasons given."""

import math

import pytest
import torch
from torch import nn

import rankcut
from rankcut.selectors import EVBMF, Budget, parse_selector
from rankcut.selectors.allocation import Option, last_passing, walk_to_budget

from toy_models import cnn_factory, cnn_inputs, planted


class Stack(nn.Module):
    """Linear layers of several shapes with decaying spectra (so selectors have something to choose)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList()
        for i, (m, n) in enumerate([(64, 96), (128, 64), (96, 128), (80, 96)]):
            layer = nn.Linear(n, m)
            U = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
            V = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
            k = min(m, n)
            values = torch.exp(-torch.arange(k, dtype=torch.float32) / (6 + 5 * i))
            with torch.no_grad():
                layer.weight.copy_(U[:, :k] @ torch.diag(values) @ V[:, :k].T)
            self.layers.append(layer)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack_inputs():
    return torch.randn(4, 96)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_energy_picks_the_smallest_rank_holding_the_fraction(fraction):
    model = Stack()
    _, report = rankcut.compress(model, f"energy:{fraction}", progress=False)
    for layer, module in zip(report.plan.layers, model.layers, strict=True):
        values = torch.linalg.svdvals(module.weight.double())
        energy = (values**2).cumsum(0) / (values**2).sum()
        if layer.rank is None:
            assert "not worth it" in layer.reason
            first = int((energy < fraction - 1e-12).sum()) + 1
            assert not rankcut.DECOMPOSITIONS["svd"].pays_off(_info(model, layer.name), first)
            continue
        assert energy[layer.rank - 1] >= fraction - 1e-9
        assert layer.rank == 1 or energy[layer.rank - 2] < fraction
        assert "energy:" in layer.reason and "holds" in layer.reason


def _info(model, name):
    from rankcut.layers import describe_layer

    return describe_layer(name, model.get_submodule(name))


def test_evbmf_finds_a_planted_linear_rank_and_explains_it():
    layer = nn.Linear(200, 60, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(planted(60, 200, 6, 0.05, seed=9))
    _, report = rankcut.compress(nn.Sequential(layer), "evbmf", progress=False)
    entry = report.plan.layers[0]
    assert entry.rank == 6
    assert "σ²=" in entry.reason and "threshold=" in entry.reason and "6 of 60 values above it" in entry.reason


def test_evbmf_weakening_and_floor():
    layer = nn.Linear(200, 60, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(planted(60, 200, 6, 0.05, seed=9))
    _, report = rankcut.compress(nn.Sequential(layer), "evbmf:0.5", progress=False)
    assert report.plan.layers[0].rank == 60 - math.floor(0.5 * (60 - 6)) == 33
    assert "weakened 0.5 → 33" in report.plan.layers[0].reason
    noise = nn.Linear(100, 40, bias=False)
    _, floor = rankcut.compress(nn.Sequential(noise), EVBMF(min_rank=4), progress=False)
    assert floor.plan.layers[0].rank == 4 and "floor 4" in floor.plan.layers[0].reason


def test_evbmf_tucker2_uses_both_unfoldings():
    g = torch.Generator().manual_seed(3)
    core = torch.randn(1, 5, 3, 3, 3, generator=g, dtype=torch.float64)
    U_out = torch.linalg.qr(torch.randn(1, 48, 5, generator=g, dtype=torch.float64))[0]
    U_in = torch.linalg.qr(torch.randn(1, 40, 3, generator=g, dtype=torch.float64))[0]
    kernel = 20 * torch.einsum("gtr,grskl,gqs->gtqkl", U_out, core, U_in)[0]
    conv = nn.Conv2d(40, 48, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(kernel + 0.01 * torch.randn(kernel.shape, generator=g, dtype=torch.float64))
    _, report = rankcut.compress(nn.Sequential(conv), "evbmf", decomposition="tucker2", progress=False)
    entry = report.plan.layers[0]
    assert entry.rank == (5, 3)
    assert entry.reason.count("values above it") == 2 and "out:" in entry.reason and "in:" in entry.reason


@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.7])
def test_budget_hits_its_target(metric, fraction):
    model = Stack()
    _, report = rankcut.compress(model, f"budget:{metric}={fraction}", example_inputs=stack_inputs(), progress=False)
    before = sum(getattr(layer, f"{metric}_before") for layer in report.plan.layers)
    after = sum(getattr(layer, f"{metric}_after") for layer in report.plan.layers)
    largest_step = max(64 + 96, 128 + 64, 96 + 128, 80 + 96) * (4 if metric == "macs" else 1)
    assert after <= fraction * before
    assert after >= fraction * before - largest_step  # within one rank of one layer
    for layer in report.plan.factorized():
        assert layer.params_after < layer.params_before and layer.macs_after < layer.macs_before
        assert f"budget:{metric}={fraction:g}" in layer.reason


def test_budget_prefers_layers_with_fast_decaying_spectra():
    model = Stack()
    _, report = rankcut.compress(model, "budget:params=0.4", progress=False)
    kept = [layer.params_after / layer.params_before for layer in report.plan.layers]
    assert kept[0] < kept[3]  # layer 0 decays fastest, so it gives up the most


def test_budget_round_to_and_bounds():
    model = Stack()
    _, report = rankcut.compress(model, "budget:params=0.5", round_to=8, progress=False)
    assert all(layer.rank % 8 == 0 for layer in report.plan.factorized())
    selector = Budget(0.5, min_keep=0.2, max_keep=0.8)
    _, bounded = rankcut.compress(model, selector, progress=False)
    for layer in bounded.plan.layers:
        assert 0.2 <= layer.params_after / layer.params_before <= 0.8


def test_budget_errors():
    with pytest.raises(ValueError, match="cannot be met"):
        rankcut.compress(Stack(), Budget(0.05, min_keep=0.3), progress=False)
    with pytest.raises(ValueError, match="needs MACs"):
        rankcut.compress(Stack(), "budget:macs=0.5", progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        parse_selector("budget:flops=0.5")


def test_selectors_work_on_convs_with_every_decomposition():
    for spec in ("energy:0.9", "evbmf:0.7", "budget:params=0.5", "budget:macs=0.6"):
        for decomposition in ("svd", "auto"):
            compressed, report = rankcut.compress(cnn_factory(), spec, example_inputs=cnn_inputs(),
                                                  decomposition=decomposition, progress=False)
            assert compressed(cnn_inputs()).shape == (2, 10)
            assert report.params_after <= report.params_before


@pytest.mark.parametrize(("spec", "message"), [("energy:0", r"\(0, 1\]"), ("evbmf:2", r"\[0, 1\]"),
                                               ("full:3", "no argument"), ("budget:params=x", "expected a number")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_selector(spec)


def test_walk_to_budget_never_grows_a_layer_into_more_error():
    """The leftover budget only buys options that lower the error: with signed (loss-aware) errors a larger
    option can be predicted worse than a smaller one, and spending budget on it would make the plan worse."""
    signed = [Option(None, 10, 0.0), Option(6, 6, 0.5), Option(4, 4, -0.2), Option(2, 2, 1.0)]
    plain = [Option(None, 10, 0.0), Option(5, 5, 0.1), Option(2, 2, 0.3)]
    plan = walk_to_budget({"signed": signed, "plain": plain}, target=12)
    assert plan["signed"].rank == 4  # 6 would fit the 3 left over, but adds 0.7
    assert plan["plain"].rank == 5  # grown from 2: it lowers the error
    assert sum(option.cost for option in plan.values()) <= 12


@pytest.mark.parametrize("answer", [0, 1, 37, 899, 1000])
@pytest.mark.parametrize("guess", [1, 34, 500, 900, 1000])
def test_compact_search_finds_the_last_passing_step(answer, guess):
    """The path search (calibration, then validation) returns the last passing position, and when the guess
    fails and nothing passes it stops after two calls: the usual case for a model with nothing to give."""
    calls: list[int] = []
    low, high = last_passing(lambda p: calls.append(p) or p <= answer, guess, 0, 1001, 1001)
    assert (low, high) == (answer, answer + 1)
    assert len(calls) == len(set(calls)) and all(0 < p < 1001 for p in calls)
    if answer == 0:
        assert len(calls) <= 2
    if 0 < answer - guess < 8:  # just past a passing guess: a few calls, not a bisection of the rest of the path
        assert len(calls) <= 6
