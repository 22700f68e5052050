"""Tests of the Fashion-MNIST task and the reference CNNs on the real Fashion-MNIST files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import rankcut
from rankcut.joint import LossAware
from rankcut.models import CNN_MODELS
from rankcut.tasks.base import Task
from rankcut.tasks.fashion_mnist import (
    REFERENCE_MODELS,
    WEIGHTS_DIR,
    FashionMNISTTask,
    load_fashion_mnist,
    normalize,
    read_idx,
)

from toy_models import needs_fashion_mnist

needs_data = needs_fashion_mnist  # shared with the other tests that read the real files


@pytest.fixture(scope="module")
def task() -> FashionMNISTTask:
    return FashionMNISTTask("resnet20")


@needs_data
def test_idx_files_hold_60k_train_and_10k_test_images() -> None:
    for part, count in (("train", 60_000), ("test", 10_000)):
        images, labels = load_fashion_mnist(part)
        assert images.shape == (count, 28, 28)
        assert images.dtype == labels.dtype == np.uint8
        assert labels.shape == (count,)
        assert set(np.unique(labels).tolist()) == set(range(10))
        assert np.bincount(labels).min() == count // 10  # Fashion-MNIST is exactly balanced
    assert load_fashion_mnist("test") is load_fashion_mnist("test")  # cached


def test_read_idx_rejects_other_files(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(b"\0\0\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + bytes(4)))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)
    floats = tmp_path / "floats.gz"
    floats.write_bytes(gzip.compress(b"\0\0\x0d\x01" + (1).to_bytes(4, "big") + bytes(4)))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(floats)


def test_missing_files_name_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


@needs_data
def test_splits_are_disjoint_deterministic_and_held_out_of_train(task: FashionMNISTTask) -> None:
    indices = task.train_indices
    assert {split: len(index) for split, index in indices.items()} == {
        "validation": 5000,
        "calibration": 1000,
        "train": 54_000,
    }
    union = np.concatenate(list(indices.values()))
    assert len(np.unique(union)) == 60_000  # disjoint and covering the training file
    again = FashionMNISTTask("vgg").train_indices
    assert all(np.array_equal(indices[split], again[split]) for split in indices)
    other = FashionMNISTTask("resnet20", seed=1).train_indices
    assert not np.array_equal(indices["validation"], other["validation"])

    # Validation and calibration come from the training file, never from the test file.
    train_images, train_labels = load_fashion_mnist("train")
    for split in ("validation", "calibration"):
        images, labels = task.split_tensors(split)
        assert torch.equal(images, normalize(train_images[indices[split]]))
        assert labels.tolist() == train_labels[indices[split]].tolist()
    assert len(task.split_tensors("test")[1]) == 10_000

    # Smaller held-out sizes stay inside the default held-out images, which the committed weights never saw.
    small = FashionMNISTTask("resnet20", calibration_size=100, validation_size=300).train_indices
    held_out = set(np.concatenate([indices["validation"], indices["calibration"]]).tolist())
    assert set(np.concatenate([small["validation"], small["calibration"]]).tolist()) <= held_out


@needs_data
def test_splits_are_normalised_images(task: FashionMNISTTask) -> None:
    images, labels = task.split_tensors("validation")
    assert images.shape == (5000, 1, 28, 28)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="unknown split"):
        task.split_tensors("holdout")
    with pytest.raises(ValueError, match="unknown split"):
        task.evaluate(CNN_MODELS["resnet20"](), "train")  # training images are not an evaluation split


@needs_data
def test_calibration_batches_are_in_order(task: FashionMNISTTask) -> None:
    batches = list(task.calibration_batches(250, 100))
    assert [len(labels) for _, labels in batches] == [100, 100, 50]
    images, labels = task.split_tensors("calibration")
    assert torch.equal(torch.cat([batch for batch, _ in batches]), images[:250])
    assert torch.equal(torch.cat([batch for _, batch in batches]), labels[:250])
    with pytest.raises(ValueError, match="calibration samples"):
        next(task.calibration_batches(1001, 100))


@needs_data
@pytest.mark.parametrize("name", sorted(CNN_MODELS))
def test_every_cnn_classifies_one_example(task: FashionMNISTTask, name: str) -> None:
    inputs = task.example_inputs()
    assert inputs.shape == (1, 1, 28, 28)
    model = CNN_MODELS[name]().eval()
    assert sum(parameter.numel() for parameter in model.parameters()) <= 2_000_000
    with torch.no_grad():
        assert model(inputs).shape == (1, 10)
    loss = task.loss(model.train(), next(task.calibration_batches(8, 8)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


def test_unknown_model_and_missing_weights_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        FashionMNISTTask("resnet18")
    with pytest.raises(RuntimeError, match=r"scripts/train_cnn\.py --model vgg"):
        FashionMNISTTask("vgg", weights_dir=tmp_path).build_model()
    with pytest.raises(RuntimeError, match=r"reference_from_run\.py RUN resnet20-compressible"):
        FashionMNISTTask("resnet20-compressible", weights_dir=tmp_path).build_model()


@needs_data
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_committed_weights_classify_validation_images(name: str) -> None:
    task = FashionMNISTTask(name, calibration_size=100, validation_size=500)
    if not task.weights_path.is_file():
        pytest.skip(f"no committed weights for {name} in {WEIGHTS_DIR}")
    assert isinstance(task, Task)
    model = task.build_model()
    assert not model.training
    metrics = task.evaluate(model, "validation")
    assert metrics["accuracy"] > 0.85
    assert 0 < metrics["loss"] < 0.5
    batches = task.batch_logits(model, "validation")  # the same scores, image by image
    assert sum(len(labels) for _, labels in batches) == 500
    correct = torch.cat([logits.argmax(1) == labels for logits, labels in batches])
    assert int(correct.sum()) / len(correct) == metrics["accuracy"]


@needs_data
def test_compact_cuts_the_compressible_resnet20_by_half_with_no_validation_loss() -> None:
    """Past about half of its params its spectra hold only rounding-level components: compact's path takes
    those cuts first, and they change nothing, whatever the loss-aware rest of the path adds."""
    task = FashionMNISTTask("resnet20-compressible", calibration_size=256, validation_size=1000)
    if not task.weights_path.is_file():
        pytest.skip(f"no committed weights for resnet20-compressible in {WEIGHTS_DIR}")
    model = task.build_model()
    compressed, report = rankcut.compress(model, LossAware("compact", calibration_samples=256, progress=False),
                                          task=task, progress=False)
    before, after = report.factorizable_params
    assert after / before < 0.55
    original, kept = (task.evaluate(m, "validation") for m in (model, compressed))
    assert kept["accuracy"] >= original["accuracy"]
    assert kept["loss"] <= original["loss"] * (1 + 1e-5)
