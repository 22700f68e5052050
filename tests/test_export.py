"""Compressed models are plain modules: ONNX (onnxruntime), TorchScript (tracing and scripting) and torch.compile
work."""

import pytest
import torch

import rankcut

from toy_models import cnn_factory, cnn_inputs


@pytest.fixture(scope="module")
def compressed():
    model, _ = rankcut.compress(cnn_factory(), "fixed:0.5", decomposition="auto", progress=False)
    return model


def test_onnx_export_runs_in_onnxruntime(compressed, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = cnn_inputs()
    path = tmp_path / "model.onnx"
    torch.onnx.export(compressed, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), compressed(x), rtol=1e-4, atol=1e-5)


def test_torchscript_trace(compressed):
    x = cnn_inputs()
    traced = torch.jit.trace(compressed, (x,))
    torch.testing.assert_close(traced(x), compressed(x), rtol=1e-5, atol=1e-6)


def test_torchscript_script(compressed):
    """Scripting compiles the factors' forward passes; ``Factorized.weight`` (eager only) is left out."""
    x = cnn_inputs()
    scripted = torch.jit.script(compressed)
    torch.testing.assert_close(scripted(x), compressed(x), rtol=1e-5, atol=1e-6)


def test_torch_compile(compressed):
    x = cnn_inputs()
    compiled = torch.compile(compressed)
    torch.testing.assert_close(compiled(x), compressed(x), rtol=1e-4, atol=1e-5)
