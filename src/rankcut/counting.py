"""Count parameters and multiply-accumulates (MACs) of whole models, the same way before and after."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankcut.tasks.base import ModelInputs, call_model


def count_params(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied tensors counted once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def count_macs(model: nn.Module, example_inputs: ModelInputs) -> int:
    """MACs of one forward pass on ``example_inputs``: every matmul, conv and attention op, counted by PyTorch."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call_model(model, example_inputs)
    return counter.get_total_flops() // 2
