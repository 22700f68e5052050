"""Devices: --device names only what this machine has; plans are made in float32 as written, whatever the
caller's matmul precision; the caller's settings come back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import rankcut
from rankcut.devices import exact_float32, usable_device
from rankcut.joint import LossAware
from test_joint import TailTask


@pytest.fixture
def medium_matmuls() -> Iterator[None]:
    """The caller lets float32 products run in bfloat16 (CPUs with bfloat16 units) or TF32 (GPUs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def test_usable_device_names_what_would_work():
    assert usable_device("cpu") == torch.device("cpu")
    for spec, says in (("cuda", "not available"), ("gpu", "not a device name"), ("meta", "shapes, not values")):
        if spec == "cuda" and torch.accelerator.is_available():
            continue
        with pytest.raises(ValueError, match=says) as error:
            usable_device(spec)
        assert "'cpu'" in str(error.value)


def _product_error() -> float:
    """The largest error of a 512×512 float32 product against float64 (about 6e-5 in full float32)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=generator) for _ in range(2))
    return float(((a @ b).double() - a.double() @ b.double()).abs().max())


def test_exact_float32_restores_the_callers_settings(medium_matmuls):
    with exact_float32():
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert _product_error() < 1e-3
        with torch.backends.cudnn.flags(enabled=False):  # as Hugging Face's CTC loss does: it reads allow_tf32
            pass
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="inside"), exact_float32():
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32


def test_exact_float32_keeps_to_the_per_backend_settings_a_caller_used():
    """A caller who set the backends one by one (``fp32_precision``) gets them back the same way."""
    settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [setting.fp32_precision for setting in settings]
    try:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
        with exact_float32():
            assert [setting.fp32_precision for setting in settings] == ["ieee", "ieee"]
            assert _product_error() < 1e-3
        assert [setting.fp32_precision for setting in settings] == ["tf32", "bf16"]
    finally:
        for setting, value in zip(settings, before, strict=True):
            setting.fp32_precision = value
        torch.set_float32_matmul_precision("highest")  # one API again for the tests that follow


class RecordingTask(TailTask):
    """TailTask whose loss records the float32 precision it was computed in, and enters cudnn.flags."""

    def __init__(self) -> None:
        super().__init__()
        self.precisions: set[tuple[str, bool]] = set()

    def loss(self, model, batch):
        self.precisions.add((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        with torch.backends.cudnn.flags(enabled=False):
            return super().loss(model, batch)


def _plan(task: TailTask) -> list[tuple]:
    plan = rankcut.make_plan(task.build_model(), LossAware("compact", calibration_samples=256, batch_size=64,
                                                           progress=False), task=task)
    return [(layer.name, layer.rank, layer.components) for layer in plan.layers]


def test_plans_do_not_change_with_the_callers_matmul_precision(medium_matmuls):
    """compact tells free cuts apart by loss changes of 1e-5 relative, while bfloat16 products (on a CPU that has
    them, under "medium") are off by up to 1e-2 relative on a 512×512 product. Every loss is computed in float32
    as written, and the plan is the one made under the default precision."""
    task = RecordingTask()
    plan = _plan(task)
    assert task.precisions == {("highest", False)}
    assert torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("highest")
    assert plan == _plan(TailTask())
