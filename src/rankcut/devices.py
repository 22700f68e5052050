"""Where rankcut computes, and how exactly: a checked ``--device``, float32 kept exact on GPUs, timing on GPUs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def usable_device(spec: str | torch.device) -> torch.device:
    """``spec`` as a device this machine can compute on, or a ValueError that says which ones it has."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(spec)!r} is not a device name; {_available()}") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ValueError(f"device 'meta' holds shapes, not values: nothing can be measured on it; {_available()}")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        raise ValueError(f"device {str(spec)!r} is not available to this torch ({torch.__version__}); {_available()}")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise ValueError(f"device {str(spec)!r}: this machine has {torch.accelerator.device_count()} "
                         f"{device.type} device(s); {_available()}")
    return device


def _available() -> str:
    if not torch.accelerator.is_available():
        return "this machine computes on 'cpu' only"
    accelerator = torch.accelerator.current_accelerator()
    count = torch.accelerator.device_count()
    return f"use 'cpu' or {', '.join(repr(f'{accelerator.type}:{index}') for index in range(count))}"


# the float32 settings of matrix products and convolutions that may trade precision for speed: TF32 on GPUs,
# bfloat16 on CPUs that have it (``torch.set_float32_matmul_precision("medium")``)
_FLOAT32_SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul,
                     torch.backends.mkldnn.conv)


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products and convolutions in full precision within the block, whatever the global
    setting; restored afterwards (these settings are process-wide: other threads see them too).

    Recent GPUs default to TF32 for convolutions (10-bit mantissa: inputs rounded to about 5e-4 relative),
    and ``torch.set_float32_matmul_precision`` below "highest" lowers matrix products on GPUs and on CPUs with
    bfloat16 units. The loss statistics and the checks of ``lossless``/``compact`` compare loss changes of
    1e-5 relative, and a weight rebuilt from all its components must compute what the dense weight does:
    they need float32 as it is written.
    """
    before = [setting.fp32_precision for setting in _FLOAT32_SETTINGS]
    try:
        for setting in _FLOAT32_SETTINGS:
            setting.fp32_precision = "ieee"
        yield
    finally:
        for setting, value in zip(_FLOAT32_SETTINGS, before, strict=True):
            setting.fp32_precision = value


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (a GPU runs asynchronously, so a timer must);
    nothing to wait for on the CPU."""
    if device.type not in ("cpu", "meta"):
        torch.accelerator.synchronize(device)
