"""Compressible training: over-parameterization, collapse, orthogonal regularization and the train pipeline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rankcut
from rankcut.linalg import evbmf
from rankcut.tasks.fashion_mnist import FashionMNISTTask
from rankcut.training import (
    OrthogonalRegularizer,
    collapse,
    low_rank_products,
    orthogonality_penalty,
    overparameterize,
    spread,
)
from rankcut.training.pipeline import TrainConfig, TrainingRun

from toy_models import Conv1D, needs_fashion_mnist

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(12, 7)), torch.randn(3, 12)),
        "conv1d": (nn.Sequential(nn.Conv1d(4, 6, 3, padding=1)), torch.randn(2, 4, 9)),
        "conv2d grouped": (nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=False)), torch.randn(2, 8, 9, 9)),
        "conv3d": (nn.Sequential(nn.Conv3d(3, 5, 2)), torch.randn(1, 3, 4, 4, 4)),
        "hf conv1d": (nn.Sequential(Conv1D(9, 5)), torch.randn(2, 3, 5)),
    }


@pytest.mark.parametrize("kind", list(_layers()))
def test_overparameterize_keeps_the_function_and_collapse_is_bitwise_exact(kind: str) -> None:
    model, x = _layers()[kind]
    model = model.double()
    x = x.double()
    reference = model(x)
    wide = overparameterize(model, factor=1.5)
    assert isinstance(wide[0], type(model[0]))  # still the layer's own class, so any training loop works
    torch.testing.assert_close(wide(x), reference, rtol=1e-12, atol=1e-12)
    (_, _, product), = low_rank_products(wide)
    assert product.width == math.ceil(1.5 * min(product.rows, product.cols))
    with torch.no_grad():  # train-like change of every factor, so that collapse folds a product that is not the SVD
        for parameter in wide.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    before = wide(x)
    collapsed = collapse(wide)
    assert not low_rank_products(collapsed)
    assert type(collapsed[0]) is type(model[0])
    assert torch.equal(collapsed(x), before)
    assert set(collapsed.state_dict()) == set(model.state_dict())


def test_overparameterize_refuses_bad_factors_and_models() -> None:
    with pytest.raises(ValueError, match="factor must be a number ≥ 1"):
        overparameterize(nn.Linear(4, 4), factor=0.5)
    with pytest.raises(ValueError, match="no factorizable layer"):
        overparameterize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no over-parameterized layer"):
        collapse(nn.Linear(3, 3))


def test_compressing_an_uncollapsed_model_says_to_collapse_first() -> None:
    wide = overparameterize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    inventory = rankcut.scan(wide)
    assert all("rankcut.collapse" in c.skip_reason for c in inventory.candidates)


def test_penalty_is_zero_for_orthogonal_factors() -> None:
    tall = torch.linalg.qr(torch.randn(2, 10, 4, dtype=torch.float64)).Q  # orthonormal columns
    wide = tall.transpose(1, 2)  # 4 x 10: orthonormal rows
    assert float(orthogonality_penalty(tall)) == pytest.approx(0, abs=1e-24)
    assert float(orthogonality_penalty(wide)) == pytest.approx(0, abs=1e-24)
    assert float(orthogonality_penalty(2 * tall)) > 0


@pytest.mark.parametrize("shape", [(1, 9, 5), (3, 4, 7)])
def test_penalty_gradient_matches_its_closed_form(shape: tuple[int, int, int]) -> None:
    A = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    orthogonality_penalty(A).backward()
    rows, width = shape[1:]
    if width <= rows:  # ‖AᵀA − I‖² / w²  →  4 A (AᵀA − I) / w²
        expected = 4 * A @ (A.transpose(1, 2) @ A - torch.eye(width, dtype=A.dtype)) / width**2
    else:  # ‖AAᵀ − I‖² / rows²  →  4 (AAᵀ − I) A / rows²
        expected = 4 * (A @ A.transpose(1, 2) - torch.eye(rows, dtype=A.dtype)) @ A / rows**2
    torch.testing.assert_close(A.grad, expected.detach())


def test_spread_is_scale_free_and_extreme_at_flat_and_single_spectra() -> None:
    flat, single = torch.ones(1, 16), torch.zeros(1, 16)
    single[0, 3] = 5.0
    assert float(spread(flat)) == pytest.approx(1.0)
    assert float(spread(single)) == pytest.approx(1 / 4)
    assert float(spread(7 * flat)) == pytest.approx(float(spread(flat)))


def test_regularizer_needs_factors_and_positive_weights() -> None:
    with pytest.raises(ValueError, match="overparameterize"):
        OrthogonalRegularizer(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="≥ 0"):
        OrthogonalRegularizer(overparameterize(nn.Linear(3, 3)), weight=-1)


def _planted_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """48 noisy samples of a rank-4 linear map on 32 dims: fewer samples than needed to average the noise out."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(48, 32, generator=g)
    W = torch.randn(32, 4, generator=g) @ torch.randn(4, 32, generator=g) / 4
    return X, X @ W.T + torch.randn(48, 32, generator=g)


def _train(orth: float, sparsity: float, steps: int = 600) -> tuple[nn.Module, list[float]]:
    X, Y = _planted_problem()
    torch.manual_seed(0)
    layer = overparameterize(nn.Sequential(nn.Linear(32, 32, bias=False)), factor=2)
    regularizer = OrthogonalRegularizer(layer, orth, sparsity)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    penalties = []
    for _ in range(steps):
        loss = ((layer(X) - Y) ** 2).mean() + regularizer()
        penalties.append(float(regularizer.terms()["orthogonality"].detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return collapse(layer), penalties


def test_training_with_the_regularizer_lowers_it() -> None:
    _, penalties = _train(orth=1.0, sparsity=0.0, steps=200)
    assert penalties[-1] < 0.5 * max(penalties)


def test_regularized_spectrum_concentrates_and_evbmf_finds_the_planted_rank() -> None:
    def summary(model: nn.Module) -> tuple[int, float]:
        values = torch.linalg.svdvals(model[0].weight.detach().double())
        return evbmf(values, (32, 32)).rank, float((values[4:] ** 2).sum() / (values**2).sum())

    plain_rank, plain_tail = summary(_train(orth=0.0, sparsity=0.0)[0])
    rank, tail = summary(_train(orth=0.1, sparsity=20.0)[0])
    assert rank == 4 < plain_rank
    assert tail < 1e-3 < plain_tail


class SmallFashionMNIST(FashionMNISTTask):
    """Fashion-MNIST with 300-image validation and test splits, so that pipeline tests stay quick."""

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().split_tensors(split)
        return (images[:300], labels[:300]) if split in ("validation", "test") else (images, labels)


def _run(tmp_path, name: str, log=lambda _: None, **settings) -> TrainingRun:
    config = TrainConfig(**{"model": "resnet20", "epochs": 2, "overparam": 1.5, "orth": 1e-2, "train_subset": 256,
                            "batch_size": 64, "select": "fixed:0.5", "finetune_epochs": 1, **settings})
    run = TrainingRun(config, tmp_path / name, log=log)
    run.task = SmallFashionMNIST("resnet20", validation_size=300, calibration_size=100)
    return run


@needs_fashion_mnist
def test_pipeline_runs_every_step_and_resumes_to_the_same_weights(tmp_path) -> None:
    steps = _run(tmp_path, "whole").run()
    assert list(steps) == ["train", "compress", "finetune"]
    assert steps["compress"]["factorizable_params_kept"] == pytest.approx(0.5, abs=0.05)
    whole = (tmp_path / "whole" / "trained.safetensors").read_bytes()

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(tmp_path, "cut", log=stop_after_first_epoch).run()
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["epochs_done"] == 1
    assert state["history"][0]["threads"] == torch.get_num_threads() and state["history"][0]["device"] == "cpu"
    messages = []
    resumed = _run(tmp_path, "cut", log=messages.append).run()
    assert any(m.startswith("resuming after epoch 1") for m in messages)
    assert (tmp_path / "cut" / "trained.safetensors").read_bytes() == whole
    assert resumed["finetune"]["test"] == steps["finetune"]["test"]
    restored = rankcut.load(tmp_path / "cut" / "finetuned", model=rankcut.models.CNN_MODELS["resnet20"]())
    assert rankcut.plan_of(restored).selector == "fixed:0.5"


@needs_fashion_mnist
def test_a_finished_run_becomes_a_reference_model_the_task_loads(tmp_path) -> None:
    run = _run(tmp_path, "run", epochs=1, sparsity=0.5)
    trained = run.train()
    script = [sys.executable, str(SCRIPTS / "reference_from_run.py"), str(tmp_path / "run"), "resnet20-compressible",
              "--out", str(tmp_path / "weights")]
    made = subprocess.run(script, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    loaded = FashionMNISTTask("resnet20-compressible", weights_dir=tmp_path / "weights").build_model()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    record = json.loads((tmp_path / "weights" / "resnet20-compressible-fashion-mnist.json").read_text())
    assert record["command"].startswith("rankcut train fashion-mnist --model resnet20 --epochs 1 --overparam 1.5 "
                                        "--orth 0.01 --sparsity 0.5 ")
    assert record["test"] == run.state["steps"]["train"]["test"]
    again = subprocess.run(script, capture_output=True, text=True)
    assert again.returncode != 0 and "add --force" in again.stderr


def test_pipeline_refuses_changed_settings_and_inconsistent_ones(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(json.dumps({"config": {"model": "resnet20", "epochs": 3}}))
    with pytest.raises(ValueError, match=r"--epochs 3 → 2"):
        _run(tmp_path, "run")
    with pytest.raises(ValueError, match="add --overparam"):
        TrainConfig(model="resnet20", epochs=1, orth=1e-3)
    with pytest.raises(ValueError, match="--model must be one of"):
        TrainConfig(model="resnet99", epochs=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        _run(tmp_path, "busy")


@pytest.mark.parametrize(("args", "message"), [
    (["mnist", "--model", "resnet20", "--epochs", "1"], "knows the task 'fashion-mnist'"),
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--orth", "1e-3"], "add --overparam"),
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--overparam", "0.5"], "width factor ≥ 1"),
    # found before training, not after it: a typo then would strand the trained model behind its settings
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--select", "bogus"], "--select: unknown selector"),
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--decomposition", "cp"],
     "--decomposition: unknown decomposition 'cp'"),
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--round-to", "0"], "--round-to must be ≥ 1"),
    (["fashion-mnist", "--model", "resnet20", "--epochs", "1", "--batch-size", "0"], "--batch-size and"),
])
def test_cli_train_refuses_bad_settings(tmp_path, args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from rankcut.cli import main

    result = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
