"""At full rank every layer type and decomposition gives the dense layer's output, for any hyper-parameters."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from rankcut.input_statistics import input_grams
from rankcut.inventory import Candidate
from rankcut.layers import DECOMPOSITIONS, describe_layer
from rankcut.layers.info import kernel_of

from toy_models import Conv1D

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def factorize_full(name: str, module: nn.Module, decomposition: str, x: torch.Tensor | None = None) -> nn.Module:
    """``module`` factorized at full rank; a decomposition that needs inputs is whitened by ``x``."""
    info = describe_layer(name, module)
    decomp = DECOMPOSITIONS[decomposition]
    assert decomp.unsupported_reason(info) is None
    kernel = kernel_of(module, info)
    if decomp.needs_inputs:
        candidate = Candidate(info, module, decomp)
        basis = decomp.basis_from_inputs(kernel, input_grams(module, [candidate], [x], lambda m, b: m(b))[name])
    else:
        basis = decomp.basis(kernel)
    bias = None if module.bias is None else module.bias.detach().double()
    return decomp.build(info, decomp.max_rank(info), basis, bias)


@st.composite
def conv_layers(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_per_group = draw(st.integers(2, 4))
    out_per_group = draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["int", "same", "valid"] if stride == (1,) * dims else ["int", "valid"]))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims)) if padding == "int" else padding
    conv = CONVS[dims](groups * in_per_group, groups * out_per_group, kernel, stride=stride, padding=padding,
                       dilation=dilation, groups=groups, bias=draw(st.booleans()), padding_mode=padding_mode,
                       dtype=torch.float64)
    size = draw(st.integers(5, 7)) if dims < 3 else 5
    x = torch.randn(2, groups * in_per_group, *([size] * dims), dtype=torch.float64)
    return conv, x


@settings(max_examples=150, deadline=None)
@given(layer=conv_layers(), decomposition=st.sampled_from(["svd", "tucker2", "whitened-svd"]))
def test_conv_full_rank_matches_dense(layer, decomposition):
    conv, x = layer
    assume(decomposition != "whitened-svd" or conv.weight.dim() < 5)  # 3-D convs: whitened-svd refuses them
    factorized = factorize_full("conv", conv, decomposition, x)
    torch.testing.assert_close(factorized(x), conv(x), rtol=1e-10, atol=1e-10)
    assert all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for m in factorized)


@settings(max_examples=40, deadline=None)
@given(n_in=st.integers(1, 12), n_out=st.integers(1, 12), bias=st.booleans(),
       decomposition=st.sampled_from(["svd", "whitened-svd"]))
def test_linear_full_rank_matches_dense(n_in, n_out, bias, decomposition):
    linear = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    factorized = factorize_full("linear", linear, decomposition, x)
    torch.testing.assert_close(factorized(x), linear(x), rtol=1e-10, atol=1e-10)
    assert all(type(m) is nn.Linear for m in factorized)


@settings(max_examples=20, deadline=None)
@given(n_in=st.integers(1, 12), n_out=st.integers(1, 12), decomposition=st.sampled_from(["svd", "whitened-svd"]))
def test_hf_conv1d_full_rank_matches_dense(n_in, n_out, decomposition):
    layer = Conv1D(n_out, n_in).double()
    info = describe_layer("c_fc", layer)
    assert info.kind == "hf_conv1d" and (info.in_channels, info.out_channels) == (n_in, n_out)
    x = torch.randn(2, 4, n_in, dtype=torch.float64)
    factorized = factorize_full("c_fc", layer, decomposition, x)
    torch.testing.assert_close(factorized(x), layer(x), rtol=1e-10, atol=1e-10)


def test_real_transformers_conv1d_is_detected_and_exact():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(7, 5).double()
    nn.init.normal_(layer.weight)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(factorize_full("c_attn", layer, "svd")(x), layer(x), rtol=1e-10, atol=1e-10)


def test_float32_layers_stay_float32_and_close():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    factorized = factorize_full("conv", conv, "tucker2")
    assert all(m.weight.dtype == torch.float32 for m in factorized)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(factorized(x), conv(x), rtol=1e-4, atol=1e-5)


def test_depthwise_conv_is_refused_with_a_reason():
    info = describe_layer("dw", nn.Conv2d(8, 8, 3, groups=8))
    for decomposition in ("svd", "tucker2"):
        assert "depthwise" in DECOMPOSITIONS[decomposition].unsupported_reason(info)


def test_unsupported_layer_types_are_not_described():
    for module in (nn.ConvTranspose2d(3, 3, 3), nn.Embedding(5, 3), nn.LazyLinear(3), nn.LayerNorm(4)):
        assert describe_layer("x", module) is None


@settings(max_examples=60, deadline=None)
@given(layer=conv_layers(), decomposition=st.sampled_from(["svd", "tucker2"]))
def test_factorized_weight_is_the_dense_weight_at_full_rank(layer, decomposition):
    conv, _ = layer
    factorized = factorize_full("conv", conv, decomposition)
    torch.testing.assert_close(factorized.weight, conv.weight, rtol=1e-10, atol=1e-10)


def test_factorized_linear_weight_is_the_dense_weight():
    linear = nn.Linear(7, 5, dtype=torch.float64)
    torch.testing.assert_close(factorize_full("linear", linear, "svd").weight, linear.weight, rtol=1e-10, atol=1e-10)
