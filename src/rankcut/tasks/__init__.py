"""Built-in tasks (real models on real data) and the contract user tasks follow."""

from __future__ import annotations

from collections.abc import Callable

from rankcut.tasks.base import SPLITS, ModelInputs, Task, call_model

TASKS: dict[str, Callable[[], Task]] = {}


def _wordnet_gloss() -> Task:
    from rankcut.tasks.wordnet import WordNetGlossTask  # needs transformers: imported on use

    return WordNetGlossTask()


def _fashion_mnist() -> Task:
    from rankcut.tasks.fashion_mnist import FashionMNISTTask  # scoring only: any 1x28x28 classifier

    return FashionMNISTTask("resnet20")


TASKS["wordnet-gloss"] = _wordnet_gloss
TASKS["fashion-mnist"] = _fashion_mnist

__all__ = ["SPLITS", "TASKS", "ModelInputs", "Task", "call_model"]
