"""Built-in vision task: classify Fashion-MNIST clothing images with small reference CNNs.

The data are the real Fashion-MNIST files (Debian package ``dataset-fashion-mnist``), read from local files;
the models are the CNNs of ``rankcut.models`` with trained weights committed in ``rankcut/weights``
(trained by ``scripts/train_cnn.py``, or by ``rankcut train`` and ``scripts/reference_from_run.py``).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankcut.models import CNN_MODELS
from rankcut.tasks.base import SPLITS, model_device

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Pixel mean and standard deviation (in [0, 1] units) of the 60,000 training images.
MEAN = 0.2860
STD = 0.3530
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Reference models: the name of each committed checkpoint and the CNN architecture it loads into. Every
# architecture is trained plainly under its own name; ``resnet20-compressible`` was trained over-parameterized
# with orthogonal and spectrum-spread regularization (its ``.json`` record holds the command).
REFERENCE_MODELS: dict[str, str] = {**{name: name for name in CNN_MODELS}, "resnet20-compressible": "resnet20"}
# The splits a task serves: the three of ``SPLITS`` and the rest of the training set, for training.
TASK_SPLITS = (*SPLITS, "train")


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (the MNIST format) into an array of its stated shape."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(part: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×28×28 uint8) and labels (N, values 0–9) of the ``train`` or ``test`` file pair; cached."""
    if part not in FILES:
        raise ValueError(f"unknown Fashion-MNIST part {part!r}; expected 'train' or 'test'")
    paths = [Path(data_dir) / name for name in FILES[part]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise RuntimeError(
            f"Fashion-MNIST files not found: {', '.join(missing)}; install them with "
            "`apt-get install dataset-fashion-mnist` (or pass data_dir pointing at a folder that holds them)"
        )
    images, labels = (read_idx(path) for path in paths)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST {part} shapes: images {images.shape}, labels {labels.shape}")
    return images, labels


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 N×28×28 images as a float32 N×1×28×28 tensor, standardised with the training mean and std."""
    return ((torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD).unsqueeze(1)


class FashionMNISTTask:
    """Fashion-MNIST 10-class classification with one of the reference models (``REFERENCE_MODELS``).

    Validation and calibration images are held out of the 60,000 training images by a seeded permutation:
    the first ``validation_size`` images of the permutation validate, the next ``calibration_size`` calibrate
    and the rest train. The 10,000 test images are for reporting only. The committed weights were trained
    with seed 0 on all but the first 6,000 permuted images, so any sizes summing to at most 6,000 (the
    defaults do) keep validation and calibration unseen by the model.
    """

    name = "fashion-mnist"
    metric_name = "accuracy"

    def __init__(
        self,
        model_name: str,
        weights_dir: str | Path | None = None,
        calibration_size: int = 1000,
        validation_size: int = 5000,
        seed: int = 0,
        data_dir: str | Path = DEFAULT_DATA_DIR,
        eval_batch_size: int = 500,
    ) -> None:
        if model_name not in REFERENCE_MODELS:
            raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(sorted(REFERENCE_MODELS))}")
        self.model_name = model_name
        self.architecture = REFERENCE_MODELS[model_name]
        self.weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        self.calibration_size = calibration_size
        self.validation_size = validation_size
        self.seed = seed
        self.data_dir = Path(data_dir)
        self.eval_batch_size = eval_batch_size
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weights_path(self) -> Path:
        """The model's trained weights: ``{model_name}-fashion-mnist.safetensors`` in ``weights_dir``."""
        return self.weights_dir / f"{self.model_name}-fashion-mnist.safetensors"

    @functools.cached_property
    def train_indices(self) -> dict[str, np.ndarray]:
        """Indices into the 60,000 training images of the validation, calibration and train splits (disjoint)."""
        count = len(load_fashion_mnist("train", self.data_dir)[1])
        held_out = self.validation_size + self.calibration_size
        if min(self.validation_size, self.calibration_size) < 1 or held_out >= count:
            raise ValueError(
                f"validation_size and calibration_size must be positive and leave training images; "
                f"got {self.validation_size} and {self.calibration_size} of {count}"
            )
        order = np.random.default_rng(self.seed).permutation(count)
        return {
            "validation": order[: self.validation_size],
            "calibration": order[self.validation_size : held_out],
            "train": order[held_out:],
        }

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (N×1×28×28 float32) and labels (N, int64) of a split of ``TASK_SPLITS``."""
        if split not in TASK_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {TASK_SPLITS}")
        if split not in self._tensors:
            if split == "test":
                images, labels = load_fashion_mnist("test", self.data_dir)
            else:
                images, labels = load_fashion_mnist("train", self.data_dir)
                index = self.train_indices[split]
                images, labels = images[index], labels[index]
            self._tensors[split] = (normalize(images), torch.from_numpy(labels.astype(np.int64)))
        return self._tensors[split]

    def build_model(self) -> nn.Module:
        """The named reference model's CNN with its committed trained weights, in eval mode."""
        from safetensors.torch import load_model

        path = self.weights_path
        if not path.is_file():
            how = (f"`python scripts/train_cnn.py --model {self.model_name} --out {self.weights_dir}`"
                   if self.model_name == self.architecture else
                   f"`rankcut train`, then `python scripts/reference_from_run.py RUN {self.model_name}`")
            raise RuntimeError(f"trained weights for {self.model_name!r} not found at {path}: train them with {how}")
        model = CNN_MODELS[self.architecture]()
        load_model(model, path)
        return model.eval()

    def example_inputs(self) -> torch.Tensor:
        """One real validation image, 1×1×28×28 (MACs are counted per image)."""
        return self.split_tensors("validation")[0][:1]

    def calibration_batches(self, num_samples: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches of the first ``num_samples`` calibration images, in a fixed order."""
        images, labels = self.split_tensors("calibration")
        if num_samples > len(labels):
            raise ValueError(f"asked for {num_samples} calibration samples but the split has {len(labels)}: "
                             "ask for at most that many (calibration_samples=, --calibration-samples)")
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            yield images[start:stop], labels[start:stop]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the model's logits on one (images, labels) batch."""
        images, labels = batch
        device = model_device(model)
        return F.cross_entropy(model(images.to(device)), labels.to(device))

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Top-1 accuracy and mean cross-entropy on ``split``, computed in eval mode without gradients.

        Batches go to the device of the model's parameters, so a model on a GPU is evaluated there.

        A model in training mode is switched to eval mode for the evaluation and back afterwards, so that
        batch-norm statistics and dropout do not change the result.
        """
        correct, total_loss, count = 0, 0.0, 0
        for logits, targets in self.batch_logits(model, split):
            correct += int((logits.argmax(dim=1) == targets).sum())
            total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
        return {"accuracy": correct / count, "loss": total_loss / count}

    def batch_logits(self, model: nn.Module, split: str = "test") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's logits and the labels of ``split``, batch by batch: what ``evaluate`` scores, image by
        image (eval mode and no gradients, as there)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        images, labels = self.split_tensors(split)
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [(model(images[start : start + self.eval_batch_size].to(device)),
                         labels[start : start + self.eval_batch_size].to(device))
                        for start in range(0, len(labels), self.eval_batch_size)]
        finally:
            model.train(was_training)
