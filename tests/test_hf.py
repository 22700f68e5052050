"""Hugging Face models through the same API and CLI, with tiny random configs (nothing is downloaded)."""

import json

import pytest
import torch
from click.testing import CliRunner

import rankcut
from rankcut import hf
from rankcut.checkpoint import PLAN_FILE, read_plan
from rankcut.cli import main

transformers = pytest.importorskip("transformers")

TINY = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    "llama-gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, bos_token_id=0, eos_token_id=0)),
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)),
}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY[name]().eval()


def output_of(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", sorted(TINY))
def test_full_rank_reproduces_the_model(name):
    model = tiny(name).double()
    inputs = hf.example_inputs(model)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    compressed, report = rankcut.compress(model, "full", decomposition="auto", progress=False)
    assert report.plan.factorized(), "no layer was factorized"
    torch.testing.assert_close(output_of(compressed, inputs), output_of(model, inputs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(TINY))
def test_save_load_round_trip_from_config_alone(name, tmp_path):
    model = tiny(name)
    compressed, report = rankcut.compress(model, "fixed:0.5", decomposition="auto", progress=False)
    assert report.macs_before is not None, "MACs are counted on default example inputs"
    out = rankcut.save(compressed, tmp_path / "out", report=report)
    assert (out / hf.CONFIG_FILE).is_file() and (out / "model.safetensors").is_file()
    assert read_plan(out).meta["architecture"] == type(model).__name__
    inputs = hf.example_inputs(model)
    for loaded in (rankcut.load(out), hf.from_pretrained(out)):
        assert type(loaded) is type(model)
        assert torch.equal(output_of(loaded, inputs), output_of(compressed, inputs))


def test_gqa_projections_keep_their_shapes():
    model = tiny("llama-gqa")
    compressed, report = rankcut.compress(model, "fixed:0.5", progress=False)
    layers = {layer.name: layer for layer in report.plan.layers}
    assert layers["model.layers.0.self_attn.k_proj"].weight_shape == [16, 32]  # 2 KV heads of 8 dims
    assert layers["model.layers.0.self_attn.k_proj"].rank is not None
    kv = compressed.model.layers[0].self_attn.k_proj
    assert kv[-1].out_features == 16


def test_gpt2_tied_head_stays_dense_and_tied(tmp_path):
    model = tiny("gpt2")
    compressed, report = rankcut.compress(model, "fixed:0.5", progress=False)
    head = next(layer for layer in report.plan.layers if layer.name == "lm_head")
    assert head.rank is None and "tied" in head.reason
    loaded = rankcut.load(rankcut.save(compressed, tmp_path / "out"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_cli_compresses_a_model_directory_and_carries_its_files(tmp_path):
    source = tmp_path / "bert"
    model = tiny("bert")
    model.save_pretrained(source)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    (source / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(99)))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    (source / "tf_model.h5").write_bytes(b"stale uncompressed weights")
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"stale graph")
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"stale")
    (source / "original" / "params.json").write_text("{}")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(source), "--select", "fixed:0.5", "--out", str(out),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "MACs (input_ids 2x16)" in result.output
    for name in ("tokenizer_config.json", "vocab.txt", "1_Pooling", hf.CONFIG_FILE, PLAN_FILE):
        assert (out / name).exists(), name
    assert not (out / "tf_model.h5").exists() and not (out / "onnx").exists(), "stale weights were carried over"
    assert (out / "original" / "params.json").exists() and not (out / "original" / "consolidated.00.pth").exists()
    loaded = rankcut.load(out)
    inputs = hf.example_inputs(model)
    assert torch.equal(output_of(loaded, inputs), output_of(rankcut.load(out), inputs))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_cli_never_writes_over_the_input_directory(tmp_path):
    source = tmp_path / "bert"
    tiny("bert").save_pretrained(source)
    result = CliRunner().invoke(main, ["compress", str(source), "--out", str(source), "--force", "--no-progress"])
    assert result.exit_code == 2 and "holds the input" in result.output
    inside = source / "compressed"
    result = CliRunner().invoke(main, ["compress", str(source), "--out", str(inside), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (inside / "compressed").exists(), "the output folder was copied into itself"


def test_pickle_only_directories_are_refused(tmp_path):
    source = tmp_path / "bert"
    tiny("bert").save_pretrained(source)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        hf.load_pretrained(source)


def test_loss_aware_selection_on_hugging_face_style_batches():
    """Dict batches, as a tokenizer gives them, through ``LoaderTask``: sample counts read from their tensors,
    HF Conv1D layers measured and cut within the budget."""
    model = tiny("gpt2")
    generator = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 99, (8, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[::2, 9:] = 0  # padded rows, as a tokenizer pads a batch of texts
        return {"input_ids": ids, "attention_mask": mask}

    def loss(m: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # as in the README
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return m(**inputs, labels=labels).loss

    data = rankcut.LoaderTask([batch() for _ in range(4)], [batch() for _ in range(2)], loss)
    assert len(list(data.calibration_batches(16, 8))) == 2  # 8 samples per batch, not 2 keys
    selector = rankcut.LossAware("lossless", 0.6, calibration_samples=16, progress=False)
    _, report = rankcut.compress(model, selector, data=data, progress=False)
    selection = report.plan.meta["selection"]
    assert selection["calibration_samples"] == selection["probe_samples"] == 16  # both batches, not one of 64
    assert any(layer.kind == "hf_conv1d" and layer.rank is not None for layer in report.plan.layers)
    before, after = report.factorizable_params
    assert after <= 0.6 * before
