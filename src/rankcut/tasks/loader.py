"""A task made of the user's own batches and loss, for the loss-aware selectors when no built-in task fits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from rankcut.tasks.base import ModelInputs, batch_loss, batch_samples


class LoaderTask:
    """Calibration batches, validation batches and a loss: enough for ``lossless`` and ``compact``.

    ``loss(model, batch)`` returns the batch's mean loss. Validation is judged by that loss alone, averaged
    over the validation samples (the metric is ``neg_loss``, higher is better), so keep the validation batches
    apart from the calibration ones. ``test`` (optional) batches, held out from both, give honest before/after
    numbers (``evaluate_split="test"``, the CLI's ``--split test``); the selectors never read them. Batches are
    re-iterated, so pass lists or loaders, not one-shot generators.
    """

    name = "user-data"
    metric_name = "neg_loss"

    def __init__(self, calibration: Iterable[Any], validation: Iterable[Any],
                 loss: Callable[[nn.Module, Any], torch.Tensor], example_inputs: ModelInputs | None = None,
                 test: Iterable[Any] | None = None) -> None:
        given = {"calibration": calibration, "validation": validation, "test": test}
        one_shot = [name for name, batches in given.items() if batches is not None and iter(batches) is batches]
        if one_shot:
            raise TypeError(f"{', '.join(one_shot)}: batches must be re-iterable (a list or a DataLoader), not "
                            "iterators")
        self.calibration, self.validation, self.test, self.loss_fn = calibration, validation, test, loss
        self._example_inputs = example_inputs

    def build_model(self) -> nn.Module:
        raise TypeError("a LoaderTask has no model of its own: pass your model to rankcut.compress")

    def example_inputs(self) -> ModelInputs | None:
        return self._example_inputs

    def calibration_batches(self, num_samples: int, batch_size: int) -> Iterator[Any]:
        """The user's calibration batches as given (``batch_size`` is theirs): whole batches, in order, until they
        hold at least ``num_samples`` samples (or run out). Reports count the samples actually used."""
        seen = 0
        for batch in self.calibration:
            if seen >= num_samples:
                return
            yield batch
            seen += batch_samples(batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        if split == "test" and self.test is None:
            raise ValueError("this LoaderTask has no test batches: give it some, held out from calibration and "
                             "validation (LoaderTask(..., test=loader)), or report on the validation split "
                             "(evaluate_split='validation', --split validation; --split none to skip)")
        if split not in ("validation", "test"):
            raise ValueError(f"a LoaderTask has a validation and a test split, not {split!r}")
        model.eval()
        with torch.no_grad():  # each batch's mean loss, weighted by its samples: a short last batch counts less
            weighted = [(float(batch_loss(self.loss_fn, model, batch)), batch_samples(batch))
                        for batch in (self.validation if split == "validation" else self.test)]
        samples = sum(count for _, count in weighted)
        if not samples:
            raise ValueError(f"LoaderTask: the {split} batches are empty"
                             + ("; the loss-aware selectors check every plan on them" if split == "validation" else ""))
        loss = sum(value * count for value, count in weighted) / samples
        return {"loss": loss, "neg_loss": -loss}
