"""Paired batch-norm recalibration: exact identity when nothing changed, the closed-form shift for a scaled
layer, restored state, clear errors; compress records it, and the saved model loads with it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankcut
from rankcut.recalibration import BatchNormRecalibration, batch_norms, estimate

from toy_models import ToyTask


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():  # running statistics as if from training, not from the calibration batches
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]


def _forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def test_an_unchanged_model_keeps_its_statistics_exactly():
    model = _conv_bn()
    before = _buffers(model)
    recalibration = BatchNormRecalibration(model, _batches(), _forward)
    assert recalibration.apply(model) == 2
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert not model.training and not any(m.training for m in model.modules())
    assert [bn.momentum for bn in batch_norms(model).values()] == [0.1, 0.1]


def test_a_scaled_layer_gets_the_closed_form_shift():
    """Doubling the first conv doubles its batch norm's input: the running mean moves by the calibration mean
    of the original input, the running variance is multiplied by 4 exactly."""
    model = _conv_bn()
    batches = _batches()
    recalibration = BatchNormRecalibration(model, batches, _forward)
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        compressed[0].weight.mul_(2)
    mean, _ = estimate(model, batches, _forward)["1"]
    recalibration.apply(compressed)
    assert torch.allclose(compressed[1].running_mean, model[1].running_mean + mean, atol=1e-5)
    assert torch.allclose(compressed[1].running_var, 4 * model[1].running_var, rtol=1e-4)


def test_applied_restores_the_statistics_afterwards():
    model = _conv_bn()
    recalibration = BatchNormRecalibration(model, _batches(), _forward)
    before = _buffers(model)
    with torch.no_grad():
        model[0].weight.mul_(3)
    with recalibration.applied(model):
        assert not torch.equal(model[1].running_var, before["1.running_var"])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_an_estimate_made_under_a_key_is_reused_for_it():
    """The same key gives the same shift without running the batches again; another key runs them."""
    model = _conv_bn()
    calls = []
    forward = lambda module, batch: calls.append(1) or module(batch)  # noqa: E731
    recalibration = BatchNormRecalibration(model, _batches(), forward)
    with torch.no_grad():
        model[0].weight.mul_(2)
    shifted = []
    for key in ("doubled", "doubled", None):
        calls.clear()
        with recalibration.applied(model, key):
            shifted.append(_buffers(model))
        shifted[-1]["passes"] = len(calls)
    assert [state.pop("passes") for state in shifted] == [3, 0, 3]
    for name, buffer in shifted[0].items():
        assert torch.equal(buffer, shifted[1][name]) and torch.equal(buffer, shifted[2][name]), name


def test_a_channel_with_no_variance_keeps_its_variance():
    model = _conv_bn()
    with torch.no_grad():
        model[0].weight[0] = 0  # channel 0 of the first batch norm sees zeros
    recalibration = BatchNormRecalibration(model, _batches(), _forward)
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        compressed[0].weight[0] = 0.1
    recalibration.apply(compressed)
    assert compressed[1].running_var[0] == model[1].running_var[0]


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="at least one calibration batch"):
        BatchNormRecalibration(_conv_bn(), [], _forward)
    recalibration = BatchNormRecalibration(_conv_bn(), _batches(), _forward)
    with pytest.raises(ValueError, match="missing"):
        recalibration.apply(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_compress_recalibrates_records_it_and_the_saved_model_loads(tmp_path):
    task = ToyTask()
    model = task.build_model()
    selector = rankcut.LossAware("lossless", 0.6, calibration_samples=64, batch_size=16, progress=False)
    convs_only = ["head.1", "head.3"]  # the batch norm follows the convs
    compressed, report = rankcut.compress(model, selector, task=task, ignore=convs_only, progress=False)
    assert report.plan.factorized()
    done = report.plan.meta["after_factorization"]
    assert done["batch_norms"] == 1 and done["calibration_samples"] == 64
    assert "batch-norm statistics of 1 layers recalibrated" in report.summary()
    assert not torch.equal(compressed.norm.running_mean, model.norm.running_mean)
    rankcut.save(compressed, tmp_path / "out")
    restored = rankcut.load(tmp_path / "out", model=task.build_model())
    assert torch.equal(restored(task.images), compressed(task.images))
    off = rankcut.LossAware("lossless", 0.6, calibration_samples=64, batch_size=16, recalibrate=False,
                            progress=False)
    plain, report = rankcut.compress(model, off, task=task, ignore=convs_only, progress=False)
    assert "after_factorization" not in report.plan.meta
    assert torch.equal(plain.norm.running_mean, model.norm.running_mean)


def test_compress_recalibrates_after_a_data_free_selector():
    """budget + recalibrate=True gives exactly the budget model with the paired shift applied by hand."""
    task = ToyTask()
    model = task.build_model()
    kwargs = {"ignore": ["head.1", "head.3"], "progress": False}
    plain, _ = rankcut.compress(model, "budget:params=0.5", **kwargs)
    corrected, report = rankcut.compress(model, "budget:params=0.5", task=task, recalibrate=True,
                                         recalibration_samples=64, **kwargs)
    BatchNormRecalibration(model, list(task.calibration_batches(64, 64)), task.loss).apply(plain)
    assert torch.equal(corrected.norm.running_mean, plain.norm.running_mean)
    assert torch.equal(corrected.norm.running_var, plain.norm.running_var)
    assert not torch.equal(corrected.norm.running_mean, model.norm.running_mean)
    assert report.plan.meta["after_factorization"]["calibration_samples"] == 64
    fewer = rankcut.LoaderTask(list(task.calibration_batches(48, 16)), [], task.loss)  # 512 asked, 48 there
    _, report = rankcut.compress(model, "budget:params=0.5", task=fewer, recalibrate=True, **kwargs)
    assert report.plan.meta["after_factorization"]["calibration_samples"] == 48
    _, report = rankcut.compress(model, "budget:params=0.5", task=fewer, recalibrate=True, recalibration_samples=40,
                                 **kwargs)
    assert report.plan.meta["after_factorization"]["calibration_samples"] == 48  # whole batches: 3 of 16


@pytest.mark.parametrize(("select", "task", "model", "message"), [
    ("budget:params=0.5", None, "cnn", "pass a task"),
    ("lossless:params=0.5", "toy", "cnn", "recalibrates batch norms by itself"),
    ("budget:params=0.5", "toy", "linear", "no batch norms"),
])
def test_compress_recalibrate_errors(select, task, model, message):
    network = ToyTask().build_model() if model == "cnn" else nn.Sequential(nn.Flatten(), nn.Linear(768, 10))
    with pytest.raises(ValueError, match=message):
        rankcut.compress(network, select, task=ToyTask() if task else None, recalibrate=True,
                         recalibration_samples=64, progress=False)
