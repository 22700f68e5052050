"""The training loop shared by ``scripts/train_cnn.py`` and ``rankcut train``: SGD, one-cycle, light augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rankcut.tasks.fashion_mnist import MEAN, STD

PAD = 2
BACKGROUND = -MEAN / STD  # a black pixel after normalisation, used to fill the crop padding


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with ``PAD``-pixel padding and a random horizontal flip, per image, on a normalised batch."""
    count, _, height, width = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD), value=BACKGROUND)
    dy = torch.randint(0, 2 * PAD + 1, (count,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    cropped = padded[torch.arange(count)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def sgd(model: nn.Module, lr: float, weight_decay: float, no_decay: Iterable[nn.Parameter] = ()) -> torch.optim.SGD:
    """Nesterov SGD (momentum 0.9) with weight decay on every parameter except ``no_decay``."""
    excluded = {id(p) for p in no_decay}
    decayed = [p for p in model.parameters() if id(p) not in excluded]
    kept = [p for p in model.parameters() if id(p) in excluded]
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if kept:
        groups.append({"params": kept, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, epochs: int,
              steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle learning-rate schedule (peak ``lr``, no momentum cycling) over ``epochs``."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                               cycle_momentum=False)


def train_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator, *, batch_size: int = 128,
                regularizer: Callable[[], torch.Tensor] | None = None, channels_last: bool = False,
                device: str | torch.device = "cpu") -> dict[str, float]:
    """One pass over the images in a seeded random order (augmented on the CPU, trained on ``device``).

    Returns the mean cross-entropy and the mean regularizer value (0 without one).
    """
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total = torch.zeros((), device=device)
    total_penalty = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = augment(images[index], generator).contiguous(memory_format=memory_format).to(device)
        targets = labels[index].to(device)
        loss = F.cross_entropy(model(batch), targets)
        penalty = regularizer() if regularizer is not None else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        optimizer.step()
        schedule.step()
        total += loss.detach() * len(index)
        total_penalty += penalty.detach() * len(index)
    return {"loss": float(total) / len(order), "regularizer": float(total_penalty) / len(order)}
