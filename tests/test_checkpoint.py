"""save → load gives the same model; bad checkpoints and unsafe writes are refused with clear errors."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankcut
from rankcut.checkpoint import PLAN_FILE, WEIGHTS_FILE, CheckpointError

from toy_models import ToyCNN, ToyTransformerBlock, cnn_factory, cnn_inputs


@pytest.fixture
def saved(tmp_path):
    compressed, report = rankcut.compress(cnn_factory(), "fixed:0.5", example_inputs=cnn_inputs(),
                                          decomposition="auto", progress=False)
    out = tmp_path / "out"
    rankcut.save(compressed, out, report=report)
    return compressed, out


def test_save_load_gives_identical_outputs(saved):
    compressed, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json", "report.json"]
    restored = rankcut.load(out, model=cnn_factory())
    x = cnn_inputs()
    torch.testing.assert_close(restored(x), compressed(x), rtol=0, atol=0)
    assert rankcut.plan_of(restored).to_dict()["layers"] == rankcut.plan_of(compressed).to_dict()["layers"]


def test_load_rebuilds_from_the_recorded_source_only_when_trusted(tmp_path):
    """Importing a module:factory named in plan.json runs its code: a checkpoint's word is not enough."""
    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    rankcut.save(compressed, tmp_path / "out", source="toy_models:cnn_factory")
    x = cnn_inputs()
    with pytest.raises(CheckpointError, match=r"names the source 'toy_models:cnn_factory'.*trust_source=True"):
        rankcut.load(tmp_path / "out")
    torch.testing.assert_close(rankcut.load(tmp_path / "out", trust_source=True)(x), compressed(x), rtol=0, atol=0)
    torch.testing.assert_close(rankcut.load(tmp_path / "out", model=cnn_factory())(x), compressed(x), rtol=0, atol=0)


@pytest.mark.parametrize(("meta", "message"), [
    ({"source": 5}, "meta.source must be a string"),
    ({"weights": "../other/model.safetensors"}, "meta.weights must name a file in the checkpoint directory"),
    ({"weights": 5}, "meta.weights must name a file"),
])
def test_hostile_plan_fields_are_refused_by_name(tmp_path, meta, message):
    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    out = rankcut.save(compressed, tmp_path / "out", source="toy_models:cnn_factory")
    plan = json.loads((out / "plan.json").read_text())
    plan["meta"].update(meta)
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=message):
        rankcut.load(out, trust_source=True)


def test_a_refused_checkpoint_gives_the_model_back_unchanged(tmp_path):
    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    out = rankcut.save(compressed, tmp_path / "out")
    state = load_file(out / "model.safetensors")
    name = next(key for key in state if key.startswith("head.1."))
    state[name] = torch.zeros(1, 1)  # a wrong shape, with the checksum made to match
    save_file(state, out / "model.safetensors")
    plan = json.loads((out / "plan.json").read_text())
    plan["meta"]["weights_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "plan.json").write_text(json.dumps(plan))
    model = cnn_factory()
    x, before = cnn_inputs(), model(cnn_inputs())
    with pytest.raises(CheckpointError, match="has shape"):
        rankcut.load(out, model=model)
    assert not any(isinstance(module, rankcut.Factorized) for module in model.modules())
    assert not hasattr(model, "_rankcut_plan")
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_tied_weights_survive_a_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ToyTransformerBlock()
    compressed, _ = rankcut.compress(model, "fixed:0.5", progress=False)
    rankcut.save(compressed, tmp_path / "out")
    torch.manual_seed(1)
    restored = rankcut.load(tmp_path / "out", model=ToyTransformerBlock())
    tokens = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(restored(tokens), compressed(tokens), rtol=0, atol=0)
    assert restored.lm_head.weight is restored.embed.weight


def test_refuses_a_non_empty_directory_unless_forced(saved, tmp_path):
    compressed, out = saved
    with pytest.raises(CheckpointError, match="not empty"):
        rankcut.save(compressed, out)
    rankcut.save(compressed, out, force=True)


def test_never_writes_over_its_input(saved):
    compressed, out = saved
    with pytest.raises(CheckpointError, match="holds the input"):
        rankcut.save(compressed, out, force=True, protected=(out,))
    with pytest.raises(CheckpointError, match="holds the input"):
        rankcut.save(compressed, out, force=True, protected=(out / WEIGHTS_FILE,))


def test_save_needs_a_compressed_model(tmp_path):
    with pytest.raises(ValueError, match="no rankcut plan"):
        rankcut.save(cnn_factory(), tmp_path / "x")


def test_corrupted_weights_are_detected(saved):
    _, out = saved
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        rankcut.load(out, model=cnn_factory())


def test_truncated_weights_are_detected(saved):
    _, out = saved
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["meta"].pop("weights_sha256")  # without the checksum, safetensors' own header check must catch it
    (out / PLAN_FILE).write_text(json.dumps(plan))
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        rankcut.load(out, model=cnn_factory())


def test_plan_and_weights_that_disagree_name_the_layer(saved):
    _, out = saved
    plan = json.loads((out / PLAN_FILE).read_text())
    for layer in plan["layers"]:
        if layer["name"] == "head.1":
            layer["rank"] -= 1
    (out / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=r"layer 'head\.1\.0'"):
        rankcut.load(out, model=cnn_factory())


def test_wrong_architecture_is_refused(saved):
    _, out = saved
    with pytest.raises(ValueError, match="'stem'"):
        rankcut.load(out, model=ToyCNN(width=8))


def test_missing_plan_and_missing_source(tmp_path, saved):
    with pytest.raises(CheckpointError, match=r"plan\.json is missing"):
        rankcut.load(tmp_path)
    _, out = saved
    with pytest.raises(CheckpointError, match="pass model="):
        rankcut.load(out)


def test_nan_in_saved_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    rankcut.save(compressed, tmp_path / "out")
    path = tmp_path / "out" / WEIGHTS_FILE
    state = load_file(path)
    state["stem.0.weight"][0] = float("nan")
    save_file(state, path)
    plan = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    plan["meta"].pop("weights_sha256")
    (tmp_path / "out" / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        rankcut.load(tmp_path / "out", model=cnn_factory())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda plan: plan["layers"][0].update(rank=True), r"field 'rank' must be null, an integer or a list"),
    (lambda plan: plan["layers"][0].update(decomposition=5), "field 'decomposition' must be a string"),
    (lambda plan: plan["layers"][0].pop("groups"), r"lacks the fields \['groups'\]"),
    (lambda plan: plan.update(meta=[]), "'meta' \\(an object\\)"),
    (lambda plan: plan["layers"].append(plan["layers"][0]), "more than once"),
])
def test_plan_fields_of_the_wrong_type_are_refused_by_name(saved, edit, message):
    _, out = saved
    plan = json.loads((out / PLAN_FILE).read_text())
    edit(plan)
    (out / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=message):
        rankcut.load(out, model=cnn_factory())


def test_a_refused_load_keeps_the_plan_the_model_carried(tmp_path):
    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    out = rankcut.save(compressed, tmp_path / "out")
    other, _ = rankcut.compress(cnn_factory(), "fixed:0.3", progress=False)
    before = rankcut.plan_of(other)
    with pytest.raises(ValueError, match="plan does not fit this model"):
        rankcut.load(out, model=other)  # a compressed model is not the architecture the plan was made for
    assert rankcut.plan_of(other) is before


def test_a_module_spec_is_told_from_a_path_with_a_colon(tmp_path):
    from rankcut.sources import is_module_spec

    assert is_module_spec("toy_models:cnn_factory") and is_module_spec("pkg_1.sub2:make_net")
    assert is_module_spec("été_mod:cnn_factory") and is_module_spec("a" * 300 + ":b")  # PEP 3131; no such path
    folder = tmp_path / "hf:v1"
    folder.mkdir()
    assert not is_module_spec(str(folder)) and not is_module_spec("C:/models/net") and not is_module_spec("a:b:c")


def test_a_recorded_task_of_the_wrong_type_is_refused_even_when_trusted(tmp_path):
    compressed, _ = rankcut.compress(cnn_factory(), "fixed:0.5", progress=False)
    out = rankcut.save(compressed, tmp_path / "out", source="toy_models:cnn_factory")
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["meta"]["task"] = 5
    (out / PLAN_FILE).write_text(json.dumps(plan))
    from rankcut.sources import resolve_model

    with pytest.raises(CheckpointError, match=r"meta\.task must be a string"):
        resolve_model(str(out), trust_source=True)

