"""Loss-aware selection (lossless / compact): statistics against finite differences, prediction against
measurement, a planted rank that compact must find, budgets lossless must respect, component-subset plans."""

from __future__ import annotations

import functools
import math
import re
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import rankcut
from rankcut.input_statistics import input_grams
from rankcut.inventory import scan
from rankcut.joint import LayerCurve, LossAware, LossProbe, gather_statistics, removal_order, substituted
from rankcut.joint.probing import low_rank_weight, spread_batches
from rankcut.layers import Fit
from rankcut.plan import Plan
from rankcut.recalibration import BatchNormRecalibration
from rankcut.tasks.base import batch_samples

from toy_models import Conv1D, ToyCNN, ToyTask


class PlantedTask:
    """Regression onto a teacher whose first layer has rank 3; the student's first layer adds a small harmful
    full-rank perturbation, so the best compact model keeps exactly 3 components there."""

    name = "planted"
    metric_name = "neg_loss"
    signal_rank = 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        U = torch.linalg.qr(torch.randn(24, self.signal_rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(20, self.signal_rank, generator=g))[0]
        self.teacher_first = U @ torch.diag(torch.tensor([8.0, 6.0, 4.0])) @ V.T
        self.noise = 0.05 * torch.randn(24, 20, generator=g)
        self.second = torch.randn(6, 24, generator=g) / 5
        self.inputs = {split: torch.randn(256, 20, generator=g) for split in ("calibration", "validation", "test")}

    def build_model(self) -> nn.Module:
        model = nn.Sequential(nn.Linear(20, 24, bias=False), nn.Linear(24, 6, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(self.teacher_first + self.noise)
            model[1].weight.copy_(self.second)
        return model.eval()

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.teacher_first.T @ self.second.T

    def example_inputs(self) -> torch.Tensor:
        return self.inputs["calibration"][:4]

    def calibration_batches(self, num_samples: int, batch_size: int):
        x = self.inputs["calibration"][:num_samples]
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return ((model(batch) - self.teacher(batch)) ** 2).sum(1).mean()

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        with torch.no_grad():
            loss = float(self.loss(model, self.inputs[split]))
        return {"loss": loss, "neg_loss": -loss}


class MixedModel(nn.Module):
    """A grouped conv with reflect padding and stride, an HF-style Conv1D and a Linear, for the statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect", groups=2)
        self.proj = Conv1D(12, 6)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x))  # (B, 6, 4, 4)
        x = torch.tanh(self.proj(x.flatten(2).transpose(1, 2).contiguous()))  # tokens: (B, 16, 12)
        return self.head(x.mean(1))


def _mixed_setup():
    torch.manual_seed(0)
    model = MixedModel().double().eval()
    x = torch.randn(12, 4, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])
    return model, batches, loss


def _mean_loss(model, batches, loss) -> float:
    with torch.no_grad():
        return sum(float(loss(model, b)) for b in batches) / len(batches)


def _directional_derivative(model, batches, loss, weight: torch.Tensor, direction: torch.Tensor) -> float:
    """d L / d t of the mean calibration loss at ``weight + t · direction``, by central differences."""
    original, step = weight.detach().clone(), 1e-6
    with torch.no_grad():
        weight.copy_(original + step * direction)
        up = _mean_loss(model, batches, loss)
        weight.copy_(original - step * direction)
        down = _mean_loss(model, batches, loss)
        weight.copy_(original)
    return (up - down) / (2 * step)


def _svd_candidates(model, batches, loss, decomposition: str):
    """The model's layers under ``decomposition`` (svd or whitened-svd, whitened by the batches' inputs)."""
    candidates = scan(model, decomposition=decomposition).factorizable()
    if decomposition == "whitened-svd":
        candidates[0].store.input_grams.update(input_grams(model, candidates, batches, loss))
    return candidates


@pytest.mark.parametrize("decomposition", ["svd", "whitened-svd"])
def test_first_order_statistics_match_finite_differences(decomposition):
    model, batches, loss = _mixed_setup()
    candidates = _svd_candidates(model, batches, loss, decomposition)
    stats = gather_statistics(model, candidates, batches, loss)
    for candidate in candidates:
        spectrum = candidate.basis()
        weight = candidate.module.weight
        for i in range(spectrum.max_rank):
            component = spectrum.reconstruct([i]).reshape(candidate.info.out_channels, candidate.info.in_per_group,
                                                          *candidate.info.kernel_size)
            if candidate.info.kind == "hf_conv1d":
                component = component.t()
            derivative = _directional_derivative(model, batches, loss, weight, component)  # along +σ_i u_i v_iᵀ
            assert stats[candidate.name].gradient[i].item() == pytest.approx(derivative, rel=1e-5, abs=1e-9)


def test_tucker2_statistics_match_finite_differences():
    """Along every step of the rank path (grouped, strided, reflect-padded conv), the gathered derivative
    equals the finite difference of the loss towards the projected kernel."""
    model, batches, loss = _mixed_setup()
    candidate = scan(model, decomposition={"conv": "tucker2"}).factorizable()[0]
    assert candidate.name == "conv" and candidate.decomposition.name == "tucker2"
    path = LossAware._path(candidate, rankcut.RankPolicy())
    assert path[0] == candidate.decomposition.max_rank(candidate.info) and len(path) > 2
    stats = gather_statistics(model, [candidate], batches, loss, paths={"conv": path})["conv"]
    n = len(path)
    assert stats.a.shape == (12, n) and stats.path == path
    weight = candidate.module.weight
    for k in range(1, n):
        projected = low_rank_weight(candidate, candidate.decomposition.leading_components(path[k]))
        derivative = _directional_derivative(model, batches, loss, weight, projected.detach() - weight.detach())
        assert -stats.a[:, n - k:].sum(1).mean().item() == pytest.approx(derivative, rel=1e-5, abs=1e-9), path[k]


def test_tucker2_prediction_matches_measurement_for_small_perturbations():
    """A grouped conv of multilinear rank (4, 3) per group plus weak noise: dropping only noise components is a
    small perturbation, and there the Taylor prediction matches the measured loss change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="reflect", groups=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(12 * 4 * 4, 5)).double().eval()
    with torch.no_grad():
        for g in range(2):
            U_out, U_in = torch.linalg.qr(torch.randn(6, 4))[0], torch.linalg.qr(torch.randn(4, 3))[0]
            kernel = torch.einsum("tr,rskl,cs->tckl", U_out, torch.randn(4, 3, 3, 3), U_in)
            model[0].weight[6 * g:6 * (g + 1)] = kernel + 0.01 * torch.randn(6, 4, 3, 3)
    x = torch.randn(12, 8, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    candidate = scan(model, decomposition={"0": "tucker2"}).factorizable()[0]
    path = LossAware._path(candidate, rankcut.RankPolicy())
    stats = gather_statistics(model, [candidate], batches, loss, paths={"0": path})
    curve = LayerCurve.of(candidate, stats["0"], "taylor")  # a tucker2 curve follows its path
    assert curve.ranks == list(path) and curve.removed_for(path[1]) == 1
    assert float(curve.dropped_energy[0]) == pytest.approx(0.0, abs=1e-12)
    small = [k for k in range(1, len(path)) if 0 < curve.dropped_energy[k] < 1e-3]
    assert small, path
    probe = LossProbe(model, batches, loss)
    for k in small:
        measured = probe.change({"0": candidate}, {"0": curve.kept(k)})
        assert abs(measured) > 0
        assert float(curve.predicted[k]) == pytest.approx(measured, rel=0.2, abs=1e-7), path[k]


@pytest.mark.parametrize(("select", "recalibrate"), [("lossless:params=0.5", True), ("compact", False)])
def test_tucker2_plans_build_what_was_measured(select, recalibrate, tmp_path):
    """Loss-aware tucker2 plans record their channel components; the built model computes exactly what the
    selector measured (the projection, not a HOOI refit, with batch norms recalibrated), and it saves and loads."""
    task = ToyTask()
    model = task.build_model()
    selector = rankcut.parse_selector(select)
    selector.calibration_samples, selector.batch_size, selector.probe_samples = 64, 16, 64
    selector.recalibrate = recalibrate  # with it, compact finds nothing to remove on this toy
    compressed, report = rankcut.compress(model, selector, task=task, decomposition="tucker2",
                                          ignore=["head.1", "head.3"], progress=False)
    factorized = report.plan.factorized()
    assert factorized  # this seeded toy gives both selectors something to factorize
    kept = {}
    for layer in factorized:
        assert layer.decomposition == "tucker2"
        if layer.components is None:  # the energy plan won validation: HOOI at its ranks, as budget builds it
            assert "energy budget plan" in layer.reason
            kept[layer.name] = Fit(tuple(layer.rank))
            continue
        assert "channel components" in layer.reason
        out_modes, in_modes = layer.components
        assert (len(out_modes), len(in_modes)) == layer.rank
        kept[layer.name] = (tuple(out_modes), tuple(in_modes))
    reference = task.build_model()
    recalibration = BatchNormRecalibration(reference, list(task.calibration_batches(64, 16)), task.loss)
    candidates = {c.name: c for c in scan(reference, decomposition="tucker2").factorizable()}
    x = task.images
    with torch.no_grad(), substituted(candidates, kept), recalibration.applied(reference) if recalibrate \
            else nullcontext():
        expected = reference(x)
    assert torch.allclose(compressed(x), expected, atol=1e-5)
    rankcut.save(compressed, tmp_path / "out")
    restored = rankcut.load(tmp_path / "out", model=task.build_model())
    assert torch.equal(restored(x), compressed(x))


@pytest.mark.parametrize(("decomposition", "name", "rank"),
                         [("tucker2", "down", (5, 3)), ("tucker2", "grouped", (4, 6)), ("svd", "head.1", 7)])
def test_a_fit_is_measured_as_it_is_built(decomposition, name, rank):
    """``Fit(rank)``, how lossless measures its energy plan, swaps in the weight ``build`` makes without
    components (tucker2: the HOOI refit, not the projection), and a plan records no components for it."""
    torch.manual_seed(0)
    candidate = {c.name: c for c in scan(ToyCNN().double(), decomposition=decomposition).factorizable()}[name]
    decomposition = candidate.decomposition
    built = decomposition.build(candidate.info, rank, candidate.basis()).double()
    torch.testing.assert_close(low_rank_weight(candidate, Fit(rank)), built.weight, rtol=1e-9, atol=1e-12)
    assert decomposition.plan_components(rank, Fit(rank)) is None
    if decomposition.name == "tucker2":
        projected = low_rank_weight(candidate, decomposition.leading_components(rank))
        assert (projected - built.weight).abs().max() > 1e-6  # HOOI moved the bases


@pytest.mark.parametrize("components", [[[0, 1], [0]], [[0, 1, 2], [0, 0]], [0, 1, 2], [[0, 1, 2], [0, 99]]])
def test_bad_tucker2_component_lists_are_refused(components):
    model = ToyCNN()
    plan = rankcut.make_plan(model, "fixed:0.5", decomposition="tucker2", ignore=["head.1", "head.3"])
    layer = plan["down"]
    layer.rank = (3, 2)
    layer.components = components
    with pytest.raises(ValueError, match="layer 'down': plan components must be two lists"):
        rankcut.apply(model, plan)


def test_statistics_leave_parameters_and_grads_untouched():
    model, batches, loss = _mixed_setup()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gather_statistics(model, scan(model).factorizable(), batches, loss)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("decomposition", ["svd", "whitened-svd"])
def test_prediction_matches_measurement_for_small_perturbations(decomposition):
    model, batches, loss = _mixed_setup()
    candidates = _svd_candidates(model, batches, loss, decomposition)
    stats = gather_statistics(model, candidates, batches, loss)
    probe = LossProbe(model, batches, loss)
    for candidate in candidates:
        curve = LayerCurve.of(candidate, stats[candidate.name], "spectrum")
        measured = probe.change({candidate.name: candidate}, {candidate.name: curve.kept(1)})
        predicted = float(curve.predicted[1])
        assert abs(measured) > 0
        assert predicted == pytest.approx(measured, rel=0.2, abs=1e-6), candidate.name


def test_a_probe_measures_each_truncation_once_unless_a_context_changes_it():
    """The same kept components on the same batches are one measurement; with ``within`` (e.g. batch-norm
    recalibration) the probe cannot know what the context does, and measures again."""
    model, batches, loss = _mixed_setup()
    candidate = scan(model).factorizable()[2]
    kept = {candidate.name: tuple(range(candidate.basis().max_rank - 1))}
    probe = LossProbe(model, batches, loss)
    first = probe.change({candidate.name: candidate}, kept)
    assert probe.change({candidate.name: candidate}, dict(kept)) == first and probe.measurements == 2
    assert probe.change({candidate.name: candidate}, kept, within=nullcontext()) == first
    assert probe.measurements == 3 and first != 0.0


def test_a_curve_re_expanded_at_the_original_model_is_the_curve():
    model, batches, loss = _mixed_setup()
    candidate = scan(model).factorizable()[2]
    stats = gather_statistics(model, [candidate], batches, loss)[candidate.name]
    curve = LayerCurve.of(candidate, stats, "spectrum")
    same = curve.around(stats, 0)
    assert torch.equal(same.predicted, curve.predicted) and torch.equal(same.standard_error, curve.standard_error)
    assert same.order == curve.order and same.probes == curve.probes == {0: 0.0}


@pytest.mark.parametrize("decomposition", ["svd", "whitened-svd"])
def test_re_expanded_prediction_matches_measurement_around_a_plan(decomposition):
    """With every layer's smallest component removed, the statistics gathered there predict both the next cut
    and the component restored, as measured from that plan."""
    model, batches, loss = _mixed_setup()
    candidates = _svd_candidates(model, batches, loss, decomposition)
    curves = {c.name: LayerCurve.of(c, gather_statistics(model, [c], batches, loss)[c.name], "spectrum")
              for c in candidates}
    by_name, origin = {c.name: c for c in candidates}, 1
    with substituted(by_name, {name: curve.kept(origin) for name, curve in curves.items()}):
        stats = gather_statistics(model, candidates, batches, loss)
        probe = LossProbe(model, batches, loss)
        for candidate in candidates:
            around = curves[candidate.name].around(stats[candidate.name], origin)
            assert around.predicted[origin] == 0 and around.probes == {origin: 0.0}
            for removed in (origin - 1, origin + 1):
                measured = probe.change({candidate.name: candidate}, {candidate.name: around.kept(removed)})
                assert abs(measured) > 0
                assert float(around.predicted[removed]) == pytest.approx(measured, rel=0.2, abs=1e-6), candidate.name


@pytest.mark.parametrize("fraction", [0.9, 0.8])
def test_a_size_measured_dear_is_not_kept_when_the_rounds_run_out(fraction):
    """The first allocation cuts layer 2 beyond its trusted range; its measurement (faked: far dearer than
    predicted) comes in the last round. The plan is then allocated once more among sizes measured or trusted,
    and takes layer 0's measured cut instead, rather than keeping the size just found dear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))
    model = model.double().eval()
    x, y = torch.randn(64, 12, dtype=torch.float64), torch.randint(0, 5, (64,))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    candidates = scan(model).factorizable()
    curves = {c.name: LayerCurve.of(c, gather_statistics(model, [c], batches, loss)[c.name], "spectrum")
              for c in candidates}
    probe, policy, tolerance = LossProbe(model, batches, loss), rankcut.RankPolicy(), 0.0
    first_layer = curves["0"]
    first_layer.probes[11] = probe.change({"0": first_layer.candidate}, {"0": first_layer.kept(11)})
    selector = LossAware("lossless", fraction, max_rounds=1, progress=False)
    selector._target = fraction * sum(selector._cost(c, None) for c in candidates)
    dear: list[tuple[str, int]] = []

    def measure_dear(todo, probe, desc) -> None:
        for curve, removed in todo:
            dear.append((curve.candidate.name, removed))
            curve.probes[removed] = 1.0

    selector._measure = measure_dear
    plan = selector._allocate(curves, policy, probe, tolerance)
    assert dear and all(name == "2" for name, _ in dear)  # the rounds ran out on layer 2's guess
    assert all((name, option.note) not in dear for name, option in plan.items())
    assert plan["0"].note == 11 and plan["2"].rank is None
    assert all(curves[name].known(option.note, tolerance) for name, option in plan.items())
    assert sum(option.cost for option in plan.values()) <= selector._target


def test_a_re_expanded_curve_interpolates_probes_on_each_side_of_its_origin():
    model, batches, loss = _mixed_setup()
    candidate = scan(model).factorizable()[1]  # 6 components
    stats = gather_statistics(model, [candidate], batches, loss)[candidate.name]
    curve = LayerCurve.of(candidate, stats, "spectrum").around(stats, 3)
    residual = {1: 0.5, 4: -0.2}  # measured minus predicted, one probe on each side
    for removed, offset in residual.items():
        curve.probes[removed] = float(curve.predicted[removed]) + offset
    energy = curve.dropped_energy
    weight = float((energy[3] - energy[2]) / (energy[3] - energy[1]))  # from the origin towards the probe
    assert curve.residual(2) == pytest.approx(weight * 0.5)
    beyond = float((energy[3] - energy[0]) / (energy[3] - energy[1]))
    assert curve.residual(0) == pytest.approx(0.5 * beyond)  # an underestimate grows with the energy moved
    assert curve.residual(5) == pytest.approx(-0.2)  # an overestimate is not scaled up
    assert curve.trusted(tolerance=1e-9) == (3, 3)
    assert curve.known(1, 1e-9) and curve.known(3, 1e-9) and not curve.known(2, 1e-9)


def test_a_probe_of_rounding_level_components_is_not_extrapolated():
    """A probe that cut only a layer's rounding-level tail measured rounding: scaling its residual by the energy
    of a real cut (1e14 times larger here) would price that cut absurdly."""
    task = TailTask()
    model = task.build_model()
    candidate = scan(model).factorizable()[1]  # the rank-6 projection: 18 components at rounding level
    stats = gather_statistics(model, [candidate], list(task.calibration_batches(64, 32)), task.loss)[candidate.name]
    curve = LayerCurve.of(candidate, stats, "spectrum")
    assert float(curve.dropped_energy[12]) < 1e-10 < float(curve.dropped_energy[20])
    curve.probes[12] = float(curve.predicted[12]) + 1e-9
    assert curve.residual(20) == pytest.approx(1e-9)


def test_upper_bound_adds_the_sampling_error_of_the_prediction():
    model, batches, loss = _mixed_setup()
    candidate = scan(model).factorizable()[0]
    stats = gather_statistics(model, [candidate], batches, loss)[candidate.name]
    curve = LayerCurve.of(candidate, stats, "spectrum")
    per_sample = torch.cumsum(stats.a.flip(1), dim=1)  # spectrum order: the smallest component goes first
    expected = per_sample.std(0) / per_sample.shape[0] ** 0.5
    assert curve.standard_error[0] == 0  # nothing removed: nothing uncertain
    torch.testing.assert_close(curve.standard_error[1:], expected[:-1])
    for removed in range(1, curve.size):
        assert curve.upper_bound(removed, 0.0) == curve.estimate(removed)
        assert curve.upper_bound(removed, 2.0) == pytest.approx(
            curve.estimate(removed) + 2 * float(expected[removed - 1]))
    with pytest.raises(ValueError, match="confidence"):
        LossAware("compact", confidence=-1)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"mode": "compact", "confidence": math.inf}, "confidence .* must be finite"),  # inf × a zero error is nan
    ({"mode": "compact", "tolerance": math.inf}, "tolerance"),
    ({"mode": "compact", "fraction": 0.3}, "compact finds its own size"),
    ({"mode": "lossless", "fraction": 0.5, "criterion": "metric"}, "criterion='metric' is compact's"),
    ({"mode": "lossless", "fraction": True}, "a number; got True"),
    ({"mode": "compact", "max_rounds": -1}, "max_rounds must be >= 0"),
    ({"mode": "compact", "max_evaluations": 0}, "max_evaluations >= 1"),
    ({"mode": "compact", "metric": "macs"}, "compact finds the smallest model in params"),
])
def test_contradictory_or_out_of_range_settings_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        LossAware(**arguments)


def test_the_summary_predicts_no_change_for_the_energy_budget_plan():
    """The Taylor curves price the loss-aware plan's sizes; when validation keeps the energy plan, no number is
    printed as its prediction."""
    from rankcut.report import describe_selection

    selection = {"mode": "lossless", "plan_source": "energy budget", "calibration_samples": 64,
                 "probe_measurements": 3, "confidence": 2.0, "seconds": {"total": 1.0}, "calibration_loss": 0.5,
                 "predicted_loss_change": None, "measured_loss_change": 0.01, "validation_checks": []}
    text = describe_selection(selection)
    assert "change not predicted (the energy budget plan was kept), measured +0.0100" in text
    assert "predicted +0.0000" not in describe_selection({**selection, "predicted_loss_change": 0.02})


def test_taylor_order_stays_in_its_window():
    model, batches, loss = _mixed_setup()
    candidate = scan(model).factorizable()[2]
    stats = gather_statistics(model, [candidate], batches, loss)
    sigma_squared = (candidate.basis().S ** 2).sum(0)
    order = removal_order(stats[candidate.name], sigma_squared, "taylor", window=2)
    assert sorted(order) == list(range(len(order)))
    for step, index in enumerate(order):  # at each step one of the two smallest components left
        left = sorted(set(range(len(order))) - set(order[:step]))
        assert index in left[-2:]


def test_compact_finds_the_planted_rank():
    task = PlantedTask()
    model = task.build_model()
    compressed, report = rankcut.compress(model, LossAware("compact", calibration_samples=256, batch_size=64,
                                                           progress=False), task=task, progress=False)
    first = report.plan["0"]
    assert first.rank == PlantedTask.signal_rank
    assert report.plan["1"].rank is None  # its full spectrum carries signal
    assert task.evaluate(compressed, "test")["loss"] < task.evaluate(model, "test")["loss"]
    selection = report.plan.meta["selection"]
    assert selection["mode"] == "compact" and selection["validation_checks"][0]["plan"] == "original"
    seconds = selection["seconds"]  # every step of the selection is timed, none twice
    parts = sum(value for step, value in seconds.items() if step != "total")
    assert min(seconds.values()) >= 0 and parts == pytest.approx(seconds["total"], abs=0.05)


def test_compact_stops_when_the_paths_first_step_fails_validation(monkeypatch):
    """Every plan passes the probe batches and fails validation: the first step's validation check ends the
    search, so nothing is truncated after two validation evaluations (the original's and the first step's)."""
    monkeypatch.setattr(LossAware, "_plan_change", lambda *args: -1.0)
    monkeypatch.setattr(LossAware, "_refusal", lambda self, metrics, baseline: "refused")
    task = ToyTask()
    plan = rankcut.make_plan(task.build_model(), LossAware("compact", calibration_samples=64, batch_size=16,
                                                           progress=False), task=task)
    checks = [check["plan"] for check in plan.meta["selection"]["validation_checks"]]
    assert checks[0] == "original" and len(checks) == 2 and checks[1].startswith("path step 1/")
    assert all(layer.rank is None for layer in plan.layers)



class TailTask(PlantedTask):
    """PlantedTask with a middle layer of exact rank 6 (a projection whose other 18 components are float
    rounding, as in a model trained to be compressible): cutting them changes nothing."""

    tail_rank = 6

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        U = torch.linalg.qr(self.teacher_first)[0][:, :self.signal_rank]  # the first layer's signal directions
        basis = torch.linalg.qr(torch.cat([U, torch.randn(24, self.tail_rank - self.signal_rank, generator=g)], 1))[0]
        self.middle = basis @ basis.T

    def build_model(self) -> nn.Module:
        first, second = super().build_model()
        middle = nn.Linear(24, 24, bias=False)
        with torch.no_grad():
            middle.weight.copy_(self.middle)
        return nn.Sequential(first, middle, second).eval()


def test_compact_takes_the_cuts_that_change_nothing_before_any_gain(monkeypatch):
    """Cutting the first layer's harmful perturbation is a gain on calibration, the first step of the greedy
    path, and here validation refuses it (as it refuses gains that were calibration noise). compact still
    removes the middle layer's rounding-level components: they go first, and change the loss by nothing."""
    validate = LossAware._validate

    def refuse_the_first_layer(self, candidates, plan, label, checks):
        metrics = validate(self, candidates, plan, label, checks)
        truncated = any(option.rank is not None for name, option in plan.items() if name == "0")
        return {**metrics, "loss": metrics["loss"] + 1.0} if truncated else metrics

    monkeypatch.setattr(LossAware, "_validate", refuse_the_first_layer)
    task = TailTask()
    model = task.build_model()
    compressed, report = rankcut.compress(model, LossAware("compact", calibration_samples=256, batch_size=64,
                                                           progress=False), task=task, progress=False)
    assert report.plan["1"].rank == TailTask.tail_rank
    assert report.plan["0"].rank is None and report.plan["2"].rank is None
    before, after = (task.evaluate(m, "test")["loss"] for m in (model, compressed))
    assert after == pytest.approx(before, rel=1e-5)
    # the report says where the search ended and why, and each dense layer where its first cut lay on the path
    search = report.plan.meta["selection"]["path_search"]
    assert 1 <= search["free_steps"] <= search["accepted"] < search["refused"] <= search["steps"]
    assert search["why"].startswith("validation loss") and "compact's path:" in report.summary()
    for name in ("0", "2"):
        assert re.search(rf"its first cut \(drop \d+ of \d+ components, ΔL estimated .+, charged .+\) is step \d+ "
                         rf"of {search['steps']} on the path; the checks stopped at step {search['accepted']}",
                         report.plan[name].reason)
    with pytest.raises(ValueError, match="tolerance"):
        LossAware("compact", tolerance=-1e-5)


def test_lossless_says_what_a_dense_layers_best_cut_would_have_cost():
    """The last layer's spectrum is all signal: lossless keeps it dense and names its cheapest cut and the params
    that cut would have saved."""
    task = TailTask()
    plan = rankcut.make_plan(task.build_model(), LossAware("lossless", 0.5, calibration_samples=256, batch_size=64,
                                                           progress=False), task=task)
    assert plan["2"].rank is None
    assert re.fullmatch(r"lossless:params=0\.5: kept dense \(the budget went to cuts that add less loss per parameter "
                        r"saved; its best \(drop \d+ of 6 components, ΔL estimated \+[\d.]+ ± [\d.]+, charged "
                        r"\+[\d.]+\) saves \d+ params\)", plan["2"].reason)


@pytest.mark.parametrize("fraction", [0.6, 0.35])
def test_lossless_respects_its_budget(fraction):
    task = ToyTask()
    model = task.build_model()
    plan = rankcut.make_plan(model, LossAware("lossless", fraction, calibration_samples=64, batch_size=16,
                                              progress=False), task=task)
    layers = [layer for layer in plan.layers if layer.supported]
    kept = sum(layer.params_after for layer in layers) / sum(layer.params_before for layer in layers)
    assert kept <= fraction
    assert kept >= fraction - 0.05
    checks = [check["plan"] for check in plan.meta["selection"]["validation_checks"]]
    assert checks in (["original", "loss-aware", "energy budget"], ["original", "re-expanded", "energy budget"])


@pytest.mark.parametrize("mode, fraction", [("lossless", 0.35), ("compact", None)])
def test_the_same_data_gives_the_same_plan(mode, fraction):
    """Two runs on the same calibration and validation data choose the same ranks, components and reasons."""
    task = ToyTask()
    plans = [rankcut.make_plan(task.build_model(), LossAware(mode, fraction, calibration_samples=64, batch_size=16,
                                                             progress=False), task=task)
             for _ in range(2)]
    assert [layer.to_dict() for layer in plans[0].layers] == [layer.to_dict() for layer in plans[1].layers]
    assert plans[0].meta["selection"]["validation_checks"] == plans[1].meta["selection"]["validation_checks"]


@pytest.mark.parametrize("reexpansions", [0, 2])
def test_a_re_expansion_is_kept_only_when_the_whole_plans_measured_loss_falls(reexpansions):
    task = ToyTask()
    plan = rankcut.make_plan(task.build_model(), LossAware("lossless", 0.35, calibration_samples=64, batch_size=16,
                                                           reexpansions=reexpansions, progress=False), task=task)
    selection = plan.meta["selection"]
    record, checks = selection["reexpansion"], [check["plan"] for check in selection["validation_checks"]]
    if not reexpansions:
        assert record == {} and checks == ["original", "loss-aware", "energy budget"]
        return
    best = record["probe_loss_change"][record["centre"]]
    assert best == min(record["probe_loss_change"].values())  # the better whole plan is the centre
    kept = False
    for step in record["steps"]:
        if not step["probe_loss_change"] < best:  # the first step that does not lower the loss ends the search
            assert step is record["steps"][-1]
            break
        best, kept = step["probe_loss_change"], True
    assert checks[1] == ("re-expanded" if kept else "loss-aware")
    assert 1 <= len(record["steps"]) <= reexpansions


class PooledModel(nn.Module):
    """The planted model plus a pooler that runs on every call but that the task's loss never reads."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.pooler = body, nn.Linear(6, 40)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        return out, self.pooler(out)


class PooledTask(PlantedTask):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return PooledModel(super().build_model()).eval()

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return ((model(batch)[0] - self.teacher(batch)) ** 2).sum(1).mean()


def test_layers_the_loss_does_not_read_take_the_energy_plans_share():
    task = PooledTask()
    model = task.build_model()
    selector = LossAware("lossless", 0.5, calibration_samples=256, batch_size=64, progress=False)
    plan = rankcut.make_plan(model, selector, task=task)
    budget = rankcut.make_plan(model, "budget:0.5", task=task)
    assert plan["pooler"].rank == budget["pooler"].rank is not None
    assert "does not depend on this layer" in plan["pooler"].reason
    layers = [layer for layer in plan.layers if layer.supported]
    kept = sum(layer.params_after for layer in layers) / sum(layer.params_before for layer in layers)
    assert 0.45 <= kept <= 0.5
    checks = {check["plan"]: check["cost"] for check in plan.meta["selection"]["validation_checks"]}
    assert checks["energy budget"] == sum(layer.params_after for layer in budget.layers if layer.supported)
    compact = rankcut.make_plan(model, LossAware("compact", calibration_samples=256, batch_size=64,
                                                 progress=False), task=task)
    assert compact["pooler"].rank is None and "kept dense" in compact["pooler"].reason


def test_loss_aware_selectors_need_a_task_and_a_size():
    model = ToyCNN()
    with pytest.raises(ValueError, match="pass task"):
        rankcut.make_plan(model, "compact")
    with pytest.raises(ValueError, match="lossless needs a size"):
        rankcut.make_plan(model, "lossless", task=ToyTask())
    empty = "calibration batches [1, 2, 3, 4, 5, 6, 7] of 8 hold no samples (asked for 512): ask for fewer"
    with pytest.raises(ValueError, match=re.escape(empty)):
        rankcut.make_plan(model, "compact", task=ToyTask())  # 512 calibration samples: empty batches past 64
    with pytest.raises(ValueError, match="calibration loss is nan; the model or the data is broken"):
        rankcut.make_plan(model, LossAware("compact", calibration_samples=64, batch_size=16, progress=False),
                          task=NanCalibrationTask())


class NanCalibrationTask(ToyTask):
    """ToyTask whose calibration images are NaN (its validation is sound)."""

    def calibration_batches(self, num_samples: int, batch_size: int):
        for images, labels in super().calibration_batches(num_samples, batch_size):
            yield torch.full_like(images, float("nan")), labels


def test_component_subset_plan_applies_saves_and_loads(tmp_path):
    task = PlantedTask()
    model = task.build_model()
    plan = rankcut.make_plan(model, "rank:4")
    plan.layers[0].components = [0, 1, 3, 5]
    compressed = rankcut.apply(model, plan)
    spectrum = scan(model).candidates[0].basis()
    expected = spectrum.reconstruct([0, 1, 3, 5])[0].float()
    factors = compressed[0]
    assert torch.allclose(factors[1].weight @ factors[0].weight, expected, atol=1e-5)
    rankcut.save(compressed, tmp_path / "out")
    restored = rankcut.load(tmp_path / "out", model=task.build_model())
    x = task.inputs["test"]
    assert torch.equal(restored(x), compressed(x))
    assert Plan.from_json(plan.to_json()).layers[0].components == [0, 1, 3, 5]


@pytest.mark.parametrize("components", [[0, 1, 2], [0, 0, 1, 2], [0, 1, 2, 99]])
def test_bad_component_lists_are_refused(components):
    model = PlantedTask().build_model()
    plan = rankcut.make_plan(model, "rank:4")
    plan.layers[0].components = components
    with pytest.raises(ValueError, match="layer '0': plan components"):
        rankcut.apply(model, plan)


def test_compact_with_the_users_own_batches():
    task = PlantedTask()
    model = task.build_model()
    data = rankcut.LoaderTask(list(task.calibration_batches(256, 64)), [task.inputs["validation"]], task.loss)
    _, report = rankcut.compress(model, "compact", data=data, progress=False)
    assert report.plan["0"].rank == PlantedTask.signal_rank
    assert "validation, original" in report.summary()
    with pytest.raises(TypeError, match="re-iterable"):
        rankcut.LoaderTask(iter([]), [], task.loss)
    with pytest.raises(TypeError, match="test: batches must be re-iterable"):
        rankcut.LoaderTask([], [], task.loss, test=iter([]))


def test_a_loader_task_reports_on_its_own_test_batches():
    """Test batches are for the before/after numbers only: the plan is the same with or without them."""
    task = PlantedTask()
    model = task.build_model()
    calibration, validation = list(task.calibration_batches(256, 64)), [task.inputs["validation"]]
    test = [task.inputs["test"][:100], task.inputs["test"][100:]]
    data = rankcut.LoaderTask(calibration, validation, task.loss, test=test)
    compressed, report = rankcut.compress(model, "compact", data=data, evaluate_split="test", progress=False)
    samples = sum(len(batch) for batch in test)
    with torch.no_grad():
        expected = sum(float(task.loss(compressed, batch)) * len(batch) for batch in test) / samples
    assert report.metrics_after["loss"] == pytest.approx(expected)
    without, _ = rankcut.compress(model, "compact", data=rankcut.LoaderTask(calibration, validation, task.loss),
                                  progress=False)
    assert report.plan.to_dict()["layers"] == rankcut.plan_of(without).to_dict()["layers"]


class Counted(list):
    """Batches that count how often they are read: a run that fails before its selection reads them once (the
    ``LoaderTask`` check that they can be re-read)."""

    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_mistakes_in_the_users_own_data_get_clear_errors():
    task = PlantedTask()
    model = task.build_model()
    calibration, validation = list(task.calibration_batches(256, 64)), [task.inputs["validation"]]

    def compact(data, **kwargs):
        return rankcut.compress(model, "compact", data=data, progress=False, **kwargs)

    def per_sample(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return (m(batch) - task.teacher(batch)).pow(2).sum(1)  # not reduced to the batch's mean

    for batches in (calibration, torch.utils.data.DataLoader(task.inputs["calibration"], batch_size=64)):
        kind = type(batches).__name__
        with pytest.raises(TypeError, match=rf"data must be a task .* a {kind} has no .*LoaderTask\(calibration"):
            compact(batches)  # batches without a loss or a validation split
    with pytest.raises(ValueError, match="compact: the task gave no calibration batches"):
        compact(rankcut.LoaderTask([], validation, task.loss))
    # the original's validation comes first: these fail before the calibration batches are read
    failing = {
        r"one number per batch.* a tensor of shape \(256,\)": (validation, per_sample, {}),
        "LoaderTask: the validation batches are empty": ([], task.loss, {}),
        "compact: the original model's validation loss is nan": (
            [torch.full_like(validation[0], float("nan"))], task.loss, {}),
        r"no test batches: give it some.*LoaderTask\(\.\.\., test=loader\).*--split validation": (
            validation, task.loss, {"evaluate_split": "test"}),
    }
    for message, (held_out, loss, kwargs) in failing.items():
        counted = Counted(calibration)
        with pytest.raises(ValueError, match=message):
            compact(rankcut.LoaderTask(counted, held_out, loss), **kwargs)
        assert counted.reads == 1, message


def test_a_probe_that_breaks_the_numerics_names_its_layer():
    """lossless probes each layer alone: a truncation whose loss is nan stops the run naming that layer."""
    task = PlantedTask()
    model = task.build_model()
    original = model[1].weight.detach().clone()

    def overflowing(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:  # as if layer '1' overflowed in float16
        value = task.loss(m, batch)
        return value if torch.equal(m[1].weight, original) else value * float("nan")

    data = rankcut.LoaderTask(list(task.calibration_batches(256, 64)), [task.inputs["validation"]], overflowing)
    with pytest.raises(ValueError, match=r"probe loss is nan with 1 layer\(s\) truncated \('1'\).*--ignore"):
        rankcut.compress(model, "lossless:params=0.5", data=data, progress=False)


@pytest.mark.parametrize("select", ["compact", "lossless:params=0.5"])
def test_loss_aware_selectors_leave_a_model_with_nothing_to_factorize_as_it_is(select):
    task = PlantedTask()
    model = task.build_model()
    compressed, report = rankcut.compress(model, select, task=task, ignore=["Linear"], progress=False)
    assert not report.plan.factorized()
    x = task.inputs["test"]
    torch.testing.assert_close(compressed(x), model(x), rtol=0, atol=0)


class FragileTask(PlantedTask):
    """Validation breaks (nan) as soon as the first layer's weight differs from the original's."""

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        if torch.equal(model[0].weight, self.build_model()[0].weight):
            return super().evaluate(model, split)
        return {"loss": float("nan"), "neg_loss": float("nan")}


def test_a_non_finite_validation_result_is_never_kept():
    task = FragileTask()
    _, report = rankcut.compress(task.build_model(), "compact", task=task, progress=False)
    assert report.plan["0"].rank is None
    assert report.plan.meta["selection"]["path_search"]["why"] == "validation loss is nan"
    with pytest.raises(ValueError, match="plan's loss is nan and the energy budget plan's loss is nan"):
        rankcut.compress(task.build_model(), "lossless:params=0.5", task=task, progress=False)
    task.metric_name = "accuracy"  # a metric the task's evaluation does not return
    with pytest.raises(ValueError, match=r"returned \['loss', 'neg_loss'\], without its metric_name 'accuracy'"):
        rankcut.compress(PlantedTask().build_model(), "compact", task=task, progress=False)
    task.metric_name = "neg_loss"
    lossless = rankcut.parse_selector("lossless:params=0.5")
    lossless.task = task
    assert lossless._score({"loss": float("inf"), "neg_loss": 0.5}) < lossless._score({"loss": 9.0, "neg_loss": -9.0})


def test_compact_criterion_metric_ignores_a_higher_loss():
    from types import SimpleNamespace

    baseline, worse_loss = {"loss": 1.0, "accuracy": 0.9}, {"loss": 1.2, "accuracy": 0.9}
    strict, by_metric = rankcut.parse_selector("compact"), rankcut.parse_selector("compact:metric")
    for selector in (strict, by_metric):
        selector.task = SimpleNamespace(metric_name="accuracy")
    assert by_metric.spec == "compact:metric" and by_metric.criterion == "metric"
    assert strict._refusal(worse_loss, baseline) == "validation loss 1.2 above the original's 1"
    assert by_metric._refusal(worse_loss, baseline) is None
    assert (by_metric._refusal({"loss": 0.5, "accuracy": 0.89}, baseline)
            == "validation accuracy 0.89 below the original's 0.9")
    with pytest.raises(ValueError, match="compact:metric"):
        rankcut.parse_selector("compact:0.5")


class TwiceModel(nn.Module):
    """One conv applied twice per forward pass: its statistics must add both calls per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("decomposition", ["svd", "tucker2"])
def test_statistics_of_a_layer_called_twice_per_forward(decomposition):
    torch.manual_seed(0)
    model = TwiceModel().double().eval()
    x, y = torch.randn(8, 6, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    candidate = scan(model, decomposition={"conv": decomposition}).factorizable()[0]
    path = LossAware._path(candidate, rankcut.RankPolicy()) if decomposition == "tucker2" else None
    stats = gather_statistics(model, [candidate], batches, loss, paths={"conv": path} if path else None)["conv"]
    n = stats.a.shape[1]
    assert stats.a.shape[0] == 8  # one row per sample, not per call
    kept = candidate.decomposition.leading_components(path[1]) if path else tuple(range(n - 1))
    direction = (low_rank_weight(candidate, kept) - candidate.module.weight).detach()
    derivative = _directional_derivative(model, batches, loss, candidate.module.weight, direction)
    assert -stats.a[:, n - 1:].sum(1).mean().item() == pytest.approx(derivative, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("decomposition", ["svd", "tucker2"])
def test_statistics_under_the_users_autocast(decomposition):
    """A loss computed under autocast (bfloat16 here, float16 on a GPU) gives half-precision activations and
    gradients; the projections still run in the layer's own precision and match the plain statistics."""
    torch.manual_seed(0)
    model = TwiceModel().eval()
    x, y = torch.randn(16, 6, 5, 5), torch.randint(0, 3, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]

    def loss(m: nn.Module, batch, half: bool = False) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            logits = m(batch[0])
        return nn.functional.cross_entropy(logits.float(), batch[1])

    candidates = scan(model, decomposition={"conv": decomposition, "head": "svd"}).factorizable()
    paths = {c.name: LossAware._path(c, rankcut.RankPolicy()) for c in candidates if c.name == "conv"}
    paths = paths if decomposition == "tucker2" else None
    plain = gather_statistics(model, candidates, batches, loss, paths=paths)
    half = gather_statistics(model, candidates, batches, functools.partial(loss, half=True), paths=paths)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # around the whole pass, gradients projected too
        around = gather_statistics(model, candidates, batches, loss, paths=paths)
    for name, stats in plain.items():
        for other in (half[name], around[name]):
            assert other.a.dtype == torch.float64
            assert torch.linalg.norm(other.a - stats.a) <= 0.05 * torch.linalg.norm(stats.a), name


@pytest.mark.parametrize(("batch", "samples"), [
    (torch.zeros(7, 3), 7),
    ((torch.zeros(5, 2), torch.zeros(5)), 5),  # (inputs, targets)
    ([torch.zeros(5, 2), torch.zeros(5)], 5),  # as a DataLoader collates it
    ({"n": torch.tensor(3), "input_ids": torch.zeros(8, 4), "attention_mask": torch.ones(8, 4)}, 8),
    (({"input_ids": torch.zeros(4, 3)}, torch.zeros(4)), 4),
    ((["a long gloss", "b"], torch.zeros(2)), 2),  # text, tokenized inside the loss
    (["one", "two", "three"], 3),
    ({"input_ids": [[1, 2, 3, 4, 5], [1, 2]], "label": [0, 1]}, 2),  # a datasets batch, not tokenized to tensors
    ({"pixel_values": [torch.zeros(3, 8, 8)] * 2, "label": [0, 1]}, 2),
    ({"gloss": {"input_ids": torch.zeros(6, 9)}}, 6),
    ("a single string", 1),
    ([(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 8, 8), 1)], 2),  # uncollated (collate_fn=lambda s: s)
    (({"input_ids": torch.zeros(5, 3)}, {"input_ids": torch.zeros(5, 2)}), 5),  # paired encodings (WordNet's)
])
def test_batches_are_counted_in_samples(batch, samples):
    assert batch_samples(batch) == samples


def test_probe_batches_are_spread_over_the_calibration_batches() -> None:
    # e.g. sorted by length: a prefix would probe only the shortest
    batches = [torch.full((64, 3), float(index)) for index in range(8)]

    def spread(samples: int, of: list = batches) -> list[int]:
        return [int(batch[0, 0]) if isinstance(batch, torch.Tensor) else int(batch["ids"][0, 0])
                for batch in spread_batches(of, samples)]

    assert spread(128) == [2, 6]
    assert spread(100) == [2, 6]  # whole batches: rounded up
    assert spread(1) == [4]
    assert spread(512) == spread(4096) == list(range(8))
    small = [{"ids": torch.full((8, 5), index)} for index in range(64)]  # a user's loader: 8 per batch, as dicts
    assert spread(512, small) == list(range(64))
    assert len(spread(128, small)) == 16
    short_last = [*batches[:7], torch.full((52, 3), 7.0)]  # 500 calibration samples
    assert spread(128, short_last) == [2, 6]  # as with 64 per batch
    uneven = [torch.full((size, 3), float(index)) for index, size in enumerate([127, 1] * 4)]
    assert spread(256, uneven) == [0, 2, 4, 5, 7]  # 3 and 4 evenly spaced batches hold 255 and 4 samples
