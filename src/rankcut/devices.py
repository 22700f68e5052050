"""Where rankcut computes, and how exactly: a checked ``--device``, float32 kept exact on GPUs, timing on GPUs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

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


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products and convolutions in full precision within the block, whatever the caller's
    settings; restored afterwards (these settings are process-wide: other threads see them too).

    Recent GPUs default to TF32 for convolutions (10-bit mantissa: inputs rounded to about 5e-4 relative),
    and ``torch.set_float32_matmul_precision`` below "highest" lowers matrix products on GPUs and on CPUs with
    bfloat16 units. The loss statistics and the checks of ``lossless``/``compact`` compare loss changes of
    1e-5 relative, and a weight rebuilt from all its components must compute what the dense weight does:
    they need float32 as it is written.
    """
    with _highest_matmul_precision(), _cudnn_without_tf32():
        yield


@contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    """Matrix products in full float32 precision, set through the API the caller used: torch refuses to read
    one after the other has set the backends apart."""
    before = _readable(torch.get_float32_matmul_precision)
    if before == "highest":  # already: nothing to set, so the caller's settings stay exactly as they are
        yield
        return
    if before is None:  # the caller set the backends one by one (``fp32_precision``): do the same
        with _fp32_precision("ieee", torch.backends.cuda.matmul, torch.backends.mkldnn.matmul):
            yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def _cudnn_without_tf32() -> Iterator[None]:
    """cuDNN without TF32, through ``allow_tf32``, which code such as ``torch.backends.cudnn.flags`` (used by
    Hugging Face's CTC loss) reads and which torch refuses to read once ``fp32_precision`` has set convolutions
    and recurrent layers apart."""
    before = _readable(lambda: torch.backends.cudnn.allow_tf32)
    if before is False:  # already
        yield
        return
    if before is None:  # the caller set them apart already: keep to their API
        with _fp32_precision("ieee", torch.backends.cudnn.conv, torch.backends.cudnn.rnn):
            yield
        return
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _readable(read: Callable[[], T]) -> T | None:
    """A precision setting, or None where torch refuses to read it (its backends were set apart)."""
    try:
        return read()
    except RuntimeError:
        return None


@contextmanager
def _fp32_precision(value: str, *settings: object) -> Iterator[None]:
    """Each of these per-backend settings at ``value`` within the block."""
    before = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = value
        yield
    finally:
        for setting, old in zip(settings, before, strict=True):
            setting.fp32_precision = old


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (a GPU runs asynchronously, so a timer must);
    nothing to wait for on the CPU."""
    if device.type not in ("cpu", "meta"):
        torch.accelerator.synchronize(device)
