"""The whole-model API: plans, selectors, the break-even guard, ignore/round_to, and clear errors."""

import json

import pytest
import torch
from torch import nn

import rankcut
from rankcut.counting import count_params
from rankcut.layers import Factorized
from rankcut.plan import Plan

from toy_models import ToyCNN, ToyTransformerBlock, cnn_factory, cnn_inputs


@pytest.fixture
def cnn() -> nn.Module:
    return cnn_factory()


def test_full_rank_compress_keeps_outputs(cnn):
    x = cnn_inputs()
    compressed, report = rankcut.compress(cnn, "full", example_inputs=x, decomposition="auto", progress=False)
    torch.testing.assert_close(compressed(x), cnn(x), rtol=1e-4, atol=1e-5)
    kinds = {layer.name: layer.decomposition for layer in report.plan.factorized()}
    assert kinds == {"stem": "tucker2", "down": "tucker2", "grouped": "tucker2", "head.1": "svd", "head.3": "svd"}
    assert "depthwise" in report.plan["depthwise"].reason


def test_compress_returns_a_new_model_unless_inplace(cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    compressed, _ = rankcut.compress(cnn, "fixed:0.5", progress=False)
    assert compressed is not cnn and isinstance(compressed.head[1], Factorized)
    assert not isinstance(cnn.head[1], Factorized)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    same, _ = rankcut.compress(cnn, "fixed:0.5", inplace=True, progress=False)
    assert same is cnn and isinstance(cnn.head[1], Factorized)


@pytest.mark.parametrize("decomposition", ["svd", "tucker2", "auto"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_fixed_fraction_keeps_at_most_that_fraction_per_layer(cnn, decomposition, fraction):
    _, report = rankcut.compress(cnn, f"fixed:{fraction}", example_inputs=cnn_inputs(), decomposition=decomposition,
                                 progress=False)
    factorized = report.plan.factorized()
    assert factorized
    for layer in factorized:
        kept = layer.params_after / layer.params_before
        assert kept <= fraction
        assert kept > fraction * 0.6, layer  # the largest rank that fits, not an arbitrary small one
        assert layer.macs_after < layer.macs_before


def test_report_counts_match_the_model(cnn):
    x = cnn_inputs()
    compressed, report = rankcut.compress(cnn, "fixed:0.5", example_inputs=x, progress=False)
    assert report.params_before == count_params(cnn)
    assert report.params_after == count_params(compressed)
    saved = sum(layer.params_before - layer.params_after for layer in report.plan.layers)
    assert report.params_before - report.params_after == saved
    assert report.macs_after < report.macs_before
    data = report.to_dict()
    for key in ("before", "after"):
        assert data["params"][key] and data["macs"][key]
    assert {"name", "kind", "decomposition", "rank", "max_rank", "params_before", "params_after"} <= set(
        data["layers"][0])
    json.dumps(data)


def test_per_layer_macs_match_pytorch_flop_counter(cnn):
    from torch.utils.flop_counter import FlopCounterMode

    x = cnn_inputs()
    compressed, report = rankcut.compress(cnn, "fixed:0.5", example_inputs=x, decomposition="auto", progress=False)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        compressed(x)
    flops = counter.get_flop_counts()  # keyed by module path under the root's class name
    for layer in report.plan.factorized():
        assert layer.macs_after == sum(flops[f"ToyCNN.{layer.name}"].values()) // 2, layer.name


def test_compress_gives_the_callers_model_back_in_its_mode(cnn):
    x = cnn_inputs()
    cnn.train()
    compressed, _ = rankcut.compress(cnn, "fixed:0.5", example_inputs=x, progress=False)
    assert cnn.training and not compressed.training  # measured and built in eval mode
    same, _ = rankcut.compress(cnn, "fixed:0.5", example_inputs=x, inplace=True, progress=False)
    assert same is cnn and not cnn.training  # in place: the model is the compressed one


def test_example_inputs_follow_the_model_to_its_device(cnn):
    """A task's example inputs live on the CPU; a model elsewhere (here the meta device, which computes shapes
    only) is still scanned and counted on them."""
    from rankcut.counting import count_macs
    from rankcut.inventory import scan

    x = cnn_inputs()
    elsewhere = ToyCNN().to("meta")
    assert count_macs(elsewhere, x) == count_macs(cnn, x)
    on_cpu, on_meta = scan(cnn, x).candidates, scan(elsewhere, x).candidates
    assert [c.info.dense_macs for c in on_meta] == [c.info.dense_macs for c in on_cpu]
    assert {c.info.device.type for c in on_meta} == {"meta"}


def test_break_even_guard_keeps_layers_that_cannot_pay_off():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(64, 64))
    _, report = rankcut.compress(model, "rank:3", progress=False)
    small, large = report.plan.layers
    assert small.rank is None and "not worth it" in small.reason  # 3·(4+4) ≥ 4·4+… : no saving
    assert large.rank == 3
    _, full = rankcut.compress(model, "full", progress=False)  # the guard is off for the exactness check
    assert all(layer.rank is not None for layer in full.plan.layers)


def test_round_to_gives_multiples_and_reasons(cnn):
    _, report = rankcut.compress(cnn, "fixed:0.5", round_to=8, progress=False)
    for layer in report.plan.factorized():
        assert layer.rank % 8 == 0 and "multiple of 8" in layer.reason


def test_ignore_by_name_prefix_and_type(cnn):
    _, report = rankcut.compress(cnn, "fixed:0.5", ignore=["head", nn.Conv2d], progress=False)
    assert not report.plan.factorized()
    assert report.plan["head.1"].reason == "ignored by request"
    _, by_type_name = rankcut.compress(cnn, "fixed:0.5", ignore=["Linear"], progress=False)
    assert {layer.name for layer in by_type_name.plan.factorized()} == {"stem", "down", "grouped"}


def test_unknown_ignore_entry_is_an_error(cnn):
    with pytest.raises(ValueError, match="'heads'"):
        rankcut.compress(cnn, "fixed:0.5", ignore=["heads"], progress=False)


def test_transformer_block_skips_what_it_must():
    torch.manual_seed(0)
    model = ToyTransformerBlock()
    tokens = torch.randint(0, 50, (2, 7))
    compressed, report = rankcut.compress(model, "full", example_inputs=tokens, progress=False)
    torch.testing.assert_close(compressed(tokens), model(tokens), rtol=1e-4, atol=1e-5)
    plan = report.plan
    assert "MultiheadAttention" in plan["attn.out_proj"].reason and plan["attn.out_proj"].rank is None
    assert "tied" in plan["lm_head"].reason and plan["lm_head"].rank is None
    assert plan["c_fc"].kind == "hf_conv1d" and plan["c_fc"].rank == 32
    assert {kind for _, kind, _ in report.other_modules} == {"Embedding", "MultiheadAttention"}


def test_apply_reproduces_a_plan_exactly(cnn):
    x = cnn_inputs()
    compressed, report = rankcut.compress(cnn, "fixed:0.4", example_inputs=x, decomposition="auto", progress=False)
    plan = Plan.from_json(report.plan.to_json())
    again = rankcut.apply(cnn_factory(), plan)
    torch.testing.assert_close(again(x), compressed(x), rtol=0, atol=0)
    assert rankcut.plan_of(again) is plan


def test_plan_table_lists_every_layer(cnn):
    _, report = rankcut.compress(cnn, "fixed:0.5", progress=False)
    table = report.plan.table()
    for layer in report.plan.layers:
        assert layer.name in table


def _edited_plan(cnn, **changes) -> Plan:
    _, report = rankcut.compress(cnn, "fixed:0.5", progress=False)
    data = json.loads(report.plan.to_json())
    for layer in data["layers"]:
        if layer["name"] == "head.1":
            layer.update(changes)
    return Plan.from_dict(data)


@pytest.mark.parametrize(("rank", "message"), [(0, "out of range"), (-3, "out of range"), (10_000, "out of range"),
                                               ([2, 2], "needs a rank like")])
def test_bad_ranks_are_refused_naming_the_layer(cnn, rank, message):
    with pytest.raises(ValueError, match=rf"'head\.1'.*{message}"):
        rankcut.apply(cnn, _edited_plan(cnn, rank=rank))


def test_plan_for_another_architecture_is_refused(cnn):
    plan = _edited_plan(cnn)
    with pytest.raises(ValueError, match="another architecture"):
        rankcut.apply(nn.Sequential(nn.Linear(3, 3)), plan)
    with pytest.raises(ValueError, match=r"'stem'.*plan has conv2d \[16, 3, 3, 3\]"):
        rankcut.apply(ToyCNN(width=8), plan)


def test_not_a_plan_is_refused():
    with pytest.raises(ValueError, match="not a rankcut plan"):
        Plan.from_json('{"layers": []}')
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{")


def test_nan_weights_are_refused_naming_the_layer(cnn):
    with torch.no_grad():
        cnn.down.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'down' has NaN or Inf weights"):
        rankcut.compress(cnn, "fixed:0.5", progress=False)


@pytest.mark.parametrize(("spec", "message"), [("fixed:1.5", r"\(0, 1\]"), ("fixed:abc", "expected a number"),
                                               ("rank:0", "positive"), ("magic", "unknown selector")])
def test_bad_selector_specs(cnn, spec, message):
    with pytest.raises(ValueError, match=message):
        rankcut.compress(cnn, spec, progress=False)


def test_inputs_the_model_does_not_take_are_refused_naming_them(cnn):
    with pytest.raises(ValueError, match=r"does not run on its example inputs \(2x5x16x16\): RuntimeError"):
        rankcut.compress(cnn, "fixed:0.5", example_inputs=torch.randn(2, 5, 16, 16), progress=False)


def test_bad_round_to_and_decomposition(cnn):
    with pytest.raises(ValueError, match="round_to"):
        rankcut.compress(cnn, "fixed:0.5", round_to=0, progress=False)
    with pytest.raises(ValueError, match="unknown decomposition 'cp3'"):
        rankcut.compress(cnn, "fixed:0.5", decomposition="cp3", progress=False)
    with pytest.raises(ValueError, match=r"available: .*svd.*, or auto"):
        rankcut.compress(cnn, "fixed:0.5", decomposition="cp3", progress=False)


def test_an_already_compressed_model_is_refused(cnn):
    """A second plan would name the first one's factors: its checkpoint could never be loaded back."""
    compressed, _ = rankcut.compress(cnn, "fixed:0.5", progress=False)
    with pytest.raises(ValueError, match=r"already compressed .* compress the original model"):
        rankcut.compress(compressed, "fixed:0.5", progress=False)


@pytest.mark.parametrize("decomposition", ["svd", "auto"])  # auto: tucker2 for the convs
def test_frozen_layers_stay_frozen_in_their_factors(cnn, decomposition):
    cnn.down.weight.requires_grad_(False)
    cnn.head[1].bias.requires_grad_(False)  # a frozen bias under a trainable weight
    compressed, _ = rankcut.compress(cnn, "fixed:0.5", decomposition=decomposition, progress=False)
    assert isinstance(compressed.down, Factorized) and isinstance(compressed.head[1], Factorized)
    assert not any(p.requires_grad for p in compressed.down.parameters())
    head = compressed.head[1]
    assert all(m.weight.requires_grad for m in head) and not head[-1].bias.requires_grad
    assert all(p.requires_grad for p in compressed.stem.parameters())


def test_arguments_of_the_wrong_kind_are_refused_by_name(cnn):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        rankcut.compress("resnet20", "fixed:0.5", progress=False)
    with pytest.raises(TypeError, match="plan must be a rankcut Plan"):
        rankcut.apply(cnn, rankcut.make_plan(cnn).to_dict())
    with pytest.raises(TypeError, match=r"decomposition must be a name .* got 3"):
        rankcut.compress(cnn, "fixed:0.5", decomposition=3, progress=False)
    with pytest.raises(ValueError, match="round_to must be a positive integer, got True"):
        rankcut.compress(cnn, "fixed:0.5", round_to=True, progress=False)
    with pytest.raises(ValueError, match="ignore: '' names no layer"):
        rankcut.compress(cnn, "fixed:0.5", ignore=[""], progress=False)
    with pytest.raises(ValueError, match="on the meta device"):
        rankcut.compress(nn.Sequential(nn.Linear(8, 8, device="meta")), "fixed:0.5", progress=False)


def test_ignore_takes_one_name_as_a_string(cnn):
    """A string is one entry, not a sequence of one-character names."""
    _, report = rankcut.compress(cnn, "fixed:0.5", ignore="head", progress=False)
    assert not report.plan["head.1"].factorized and "ignored by request" in report.plan["head.1"].reason
    assert report.plan["down"].factorized

