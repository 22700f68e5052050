"""Built-in tasks (real models on real data) and the contract user tasks follow."""

from __future__ import annotations

from collections.abc import Callable

from rankcut.tasks.base import SPLITS, ModelInputs, Task, call_model

TASKS: dict[str, Callable[[], Task]] = {}


def _wordnet_gloss() -> Task:
    from rankcut.tasks.wordnet import WordNetGlossTask  # needs transformers: imported on use

    return WordNetGlossTask()


TASKS["wordnet-gloss"] = _wordnet_gloss

__all__ = ["SPLITS", "TASKS", "ModelInputs", "Task", "call_model"]
