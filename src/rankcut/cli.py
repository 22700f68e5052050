"""The ``rankcut`` command line: inspect, compress, eval, bench and train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from rankcut import hf
from rankcut.api import compress as compress_model
from rankcut.api import gather_inputs
from rankcut.checkpoint import (
    PLAN_FILE,
    CheckpointError,
    checked_spec,
    prepare_output_dir,
    read_plan,
    save,
    write_text_atomic,
)
from rankcut.counting import count_macs, count_params
from rankcut.devices import usable_device
from rankcut.distributed import Group, init_from_environment
from rankcut.inventory import scan
from rankcut.joint import LossAware
from rankcut.joint.selector import NO_CHANGE
from rankcut.latency import compare_latency
from rankcut.plan import format_table
from rankcut.report import describe_other_modules
from rankcut.selectors import EXAMPLES, Selector, parse_selector
from rankcut.sources import ZOO, ModelSource, build_source_model, is_module_spec, resolve_model, resolve_task
from rankcut.spectrum_report import check_plot_path, spectrum_report
from rankcut.tasks.base import (
    BATCH_SIZE,
    CALIBRATION_SAMPLES,
    ModelInputs,
    NotATask,
    Task,
    describe_inputs,
    run_example,
)

MODEL_HELP = ("MODEL: a zoo name (" + ", ".join(sorted(ZOO)) + "), a saved rankcut directory, a Hugging Face "
              "model directory (config.json + safetensors), or 'package.module:factory' (with --weights "
              "FILE.safetensors)")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _example_inputs(source: ModelSource, task: Task | None, input_shape: str | None) -> ModelInputs | None:
    if input_shape:
        try:
            shape = [int(part) for part in input_shape.split(",")]
        except ValueError:
            _fail(f"--input-shape must be integers separated by commas, e.g. 1,3,32,32; got {input_shape!r}")
        if min(shape) < 1:
            _fail(f"--input-shape sizes must be ≥ 1, e.g. 1,3,32,32; got {input_shape!r}")
        try:
            return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        except RuntimeError as error:  # e.g. more memory than the machine has
            _fail(f"--input-shape {input_shape}: cannot make a random input of that shape ({error})")
    task = task or source.task
    if task is not None:
        return task.example_inputs()
    return hf.example_inputs(source.model) if hf.is_hf_model(source.model) else None


def _load(model: str, weights: str | None, task: str | None, device: str,
          trust_source: bool) -> tuple[ModelSource, Task | None]:
    """The model (moved to ``device``) and its task, or a clear error."""
    try:
        where = usable_device(device)
    except ValueError as error:
        _fail(f"--device: {error}")
    try:
        source = resolve_model(model, weights, trust_source=trust_source, task_given=bool(task))
        source.model.to(where)  # the built-in tasks' batches follow the model
        return source, resolve_task(task) if task else source.task
    except (ValueError, NotATask, CheckpointError) as error:
        _fail(str(error))


PACKAGE_FOLDER = Path(__file__).resolve().parent


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def _inputs_of(model: str, task: str | None, source: ModelSource, weights: str | None) -> tuple[Path, ...]:
    """Every file or directory a command reads its model and task from: never a place to write into. rankcut's
    own package folder is one (the zoo's committed weights live there)."""
    paths = [p for p in (source.checkpoint, weights, source.files_dir, PACKAGE_FOLDER) if p]
    for spec in (model, task):  # a module:function spec reads its module's source file
        module = sys.modules.get(spec.partition(":")[0]) if spec and is_module_spec(spec) else None
        if module is not None and getattr(module, "__file__", None):
            paths.append(module.__file__)
    return tuple(Path(p).resolve() for p in paths)


def _check_output_dir(out: str) -> None:
    """Refuse an --out inside rankcut's own package folder (the zoo's committed weights live there). A folder
    inside a Hugging Face input directory is allowed: nothing there is overwritten without --force."""
    target = Path(out).resolve()
    if _within(target, PACKAGE_FOLDER):
        raise CheckpointError(f"--out {out} lies inside rankcut's own package folder {PACKAGE_FOLDER}; choose a "
                              "folder outside it")


def _refuse_compressed_directory(model: str) -> None:
    """Refuse a saved directory whose plan factorized layers, from its plan.json alone (reading it runs no code),
    before anything is loaded: a second plan on top of the first could never be loaded back."""
    if not (Path(model) / PLAN_FILE).is_file():
        return
    try:
        plan = read_plan(model)
    except CheckpointError as error:
        _fail(str(error))
    if plan.factorized():
        source = plan.meta.get("source")
        original = f"rankcut compress {source} ..." if isinstance(source, str) and source else "the original model"
        _fail(f"{model} is already compressed: compress its original instead ({original}), with the new selector")


def _untrusted_task_hint(source: ModelSource) -> str:
    """Why a saved directory's own task was left out, when it was (see ``resolve_model``)."""
    if source.untrusted_task is None:
        return ""
    return (f" (its plan.json names the task {source.untrusted_task!r}, which is imported only with "
            "--trust-source: importing runs its code)")


def _check_output_file(path: str, option: str, inputs: tuple[Path, ...], out: str | None = None,
                       force: bool | None = None) -> None:
    """Refuse to write ``option``'s file over an input, into an input directory or into ``out`` (which the run
    fills), or, when ``force`` is given, over an existing file unless it is true."""
    target = Path(path).resolve()
    for item in inputs:
        if _within(target, item):
            raise CheckpointError(f"{option} {path}: {'it is' if target == item else 'it lies inside'} the input "
                                  f"{item}; choose a path outside the inputs")
    if out is not None and _within(target, Path(out).resolve()):
        raise CheckpointError(f"{option} {path} lies inside --out {out}, which the saved model fills (it holds "
                              "report.json already); choose a path outside it")
    if target.is_dir():
        raise CheckpointError(f"{option} {path} is a directory; give a file path")
    made_by_out = out is not None and target.parent in Path(out).resolve().parents  # saving creates it first
    if not target.parent.is_dir() and not made_by_out:
        raise CheckpointError(f"{option} {path}: the folder {target.parent} does not exist; create it first")
    if force is False and target.exists():
        raise CheckpointError(f"{option} {path} exists; choose another path or pass --force to overwrite it")


DECOMPOSITION_HELP = ("svd, tucker2, auto (tucker2 for k×k convs, svd for the rest) or whitened-svd (svd of the "
                      "weights whitened by their inputs on --task's calibration samples: least output error).")


@click.group(help="Make trained PyTorch models smaller and faster by low-rank factorization.\n\n" + MODEL_HELP)
def main() -> None:
    torch.manual_seed(0)
    init_from_environment()
    # module:function specs import from the working directory, as under `python -m rankcut`
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


_model_argument = click.argument("model")
_weights_option = click.option("--weights", type=click.Path(exists=True, dir_okay=False),
                               help="Safetensors weights for a module:factory model.")
_task_option = click.option("--task", help="Built-in task name or module:function (default: the model's own).")
_shape_option = click.option("--input-shape", help="Random example input shape, e.g. 1,3,32,32 (when no task).")
_trust_option = click.option("--trust-source", is_flag=True,
                             help="MODEL is a saved directory whose plan.json names a module:factory model or "
                                  "module:function task: import it (this runs its code). Only for checkpoints you "
                                  "trust.")
_device_option = click.option("--device", default="cpu", show_default=True,
                              help="Where to compute: cpu, cuda, cuda:1, mps… The model and the built-in tasks' "
                                   "batches go there; a --task module:function's loss moves its own batches.")


def _model_options(command):
    """MODEL, --weights, --task, --input-shape and --device: how every command finds its model and inputs."""
    for option in (_trust_option, _device_option, _shape_option, _task_option, _weights_option, _model_argument):
        command = option(command)
    return command


@main.command(help="List every layer: shape, params, MACs, the decomposition, its full and break-even ranks.")
@_model_options
@click.option("--decomposition", default="svd", show_default=True, help=DECOMPOSITION_HELP)
@click.option("--spectrum", is_flag=True, help="Also print per-layer spectra (EVBMF, energy ranks) and plot them.")
@click.option("--plot", default="spectrum.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where --spectrum writes its PNG.")
def inspect(model: str, weights: str | None, task: str | None, input_shape: str | None, device: str,
            trust_source: bool, decomposition: str, spectrum: bool, plot: str) -> None:
    source, task_obj = _load(model, weights, task, device, trust_source)
    inputs = _example_inputs(source, task_obj, input_shape)
    try:
        if spectrum:
            _check_output_file(plot, "--plot", _inputs_of(model, task, source, weights))
            check_plot_path(plot)
        inventory = scan(source.model, inputs, decomposition)
        if spectrum:
            gather_inputs(source.model, [c for c in inventory.factorizable() if c.decomposition.needs_inputs],
                          task_obj, CALIBRATION_SAMPLES)
    except (ValueError, CheckpointError, RuntimeError) as error:
        _fail(str(error))
    rows = [("layer", "kind", "weight", "params", "MACs", "decomposition", "full rank", "largest paying rank", "note")]
    for c in inventory.candidates:
        info, decomp = c.info, c.decomposition
        if c.skip_reason:
            rows.append((c.name, info.kind, "x".join(map(str, info.weight_shape)), f"{info.dense_params:,}",
                         f"{info.dense_macs:,}", "-", "-", "-", c.skip_reason))
            continue
        paying = [r for r in decomp.ranks_by_size(info) if decomp.pays_off(info, r)]
        rows.append((c.name, info.kind, "x".join(map(str, info.weight_shape)), f"{info.dense_params:,}",
                     f"{info.dense_macs:,}", decomp.name, str(decomp.max_rank(info)),
                     str(paying[-1]) if paying else "none", ""))
    click.echo(format_table(rows))
    total = count_params(source.model)
    factorizable = sum(c.info.dense_params for c in inventory.factorizable())
    click.echo(f"\nparams: {total:,} in total, {factorizable:,} ({factorizable / total:.1%}) in factorizable layers")
    if inputs is not None:
        click.echo(f"MACs: {count_macs(source.model, inputs):,} per forward pass on {describe_inputs(inputs)}")
    if inventory.other_modules:
        click.echo(describe_other_modules(inventory.other_modules))
    if spectrum:
        factorizable = inventory.factorizable()
        try:
            click.echo("\n" + spectrum_report(factorizable, plot))
        except RuntimeError as error:
            _fail(str(error))
        click.echo(f"spectra plotted to {plot}")


@main.command(help="Factorize a model and save it (safetensors + plan.json), printing the plan and the report.")
@_model_options
@click.option("--select", default="fixed:0.5", show_default=True,
              help=f"Rank selector: {EXAMPLES}. fixed/budget fractions are of params (or MACs) KEPT.")
@click.option("--target", help="Size for --select lossless: params=F or macs=F, the fraction KEPT (e.g. params=0.3).")
@click.option("--calibration-samples", default=CALIBRATION_SAMPLES, show_default=True, type=int,
              help="lossless/compact: calibration samples for the loss statistics and probes (and for --recalibrate).")
@click.option("--batch-size", default=BATCH_SIZE, show_default=True, type=int,
              help="lossless/compact: calibration batch size.")
@click.option("--probe-samples", type=int,
              help="lossless/compact: calibration samples each probe measures (default: all of them).")
@click.option("--confidence", default=2.0, show_default=True, type=float,
              help="lossless/compact: standard errors added to each cut's estimated loss change (0: none).")
@click.option("--reexpansions", default=2, show_default=True, type=int,
              help="lossless: times the loss may be re-expanded around its best plan and the budget allocated "
                   "again (0: allocate once, from the original model).")
@click.option("--tolerance", default=NO_CHANGE, show_default=True, type=float,
              help="compact: a validation loss or metric change within this fraction of the original's counts as "
                   "none.")
@click.option("--recalibrate/--no-recalibrate", default=None,
              help="Correct batch-norm statistics on the task's calibration samples (no training). Default: on for "
                   "lossless/compact, off for the other selectors (--recalibrate turns it on; needs --task).")
@click.option("--decomposition", default="svd", show_default=True, help=DECOMPOSITION_HELP)
@click.option("--ignore", multiple=True, help="Layer name (or prefix module) or type name to keep dense; repeatable.")
@click.option("--round-to", default=1, show_default=True, type=int, help="Round ranks to a multiple of N.")
@click.option("--latency-guard", is_flag=True,
              help="Time every layer on this machine and keep dense those whose factors are not faster.")
@click.option("--split", default="test", show_default=True, help="Split to report the metric on ('none' to skip).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Keep spectra and loss statistics here, keyed by the weights' hash, for the next run.")
@click.option("--low-memory", is_flag=True,
              help="Keep singular vectors on disk and factorize in place: peak memory near the model's size.")
@click.option("--randomized-above", type=int, metavar="N",
              help="Layers with at least N weights get a checked randomized SVD of their leading components.")
@click.option("--out", type=click.Path(file_okay=False), help="Directory to save the compressed model into.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--force", is_flag=True, help="Allow a non-empty --out directory and an existing --report file.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def compress(model: str, weights: str | None, task: str | None, input_shape: str | None, device: str,
             trust_source: bool, select: str,
             target: str | None, calibration_samples: int, batch_size: int, probe_samples: int | None,
             confidence: float, reexpansions: int, tolerance: float, recalibrate: bool | None, decomposition: str,
             ignore: tuple[str, ...], round_to: int, latency_guard: bool, split: str, cache_dir: str | None,
             low_memory: bool, randomized_above: int | None, out: str | None, report_path: str | None, force: bool,
             progress: bool) -> None:
    main_process = Group.current().is_main  # under torchrun, the others only share the work
    progress = progress and main_process
    _refuse_compressed_directory(model)
    source, task_obj = _load(model, weights, task, device, trust_source)
    try:
        selector = _selector(select, target, calibration_samples, batch_size, probe_samples, confidence,
                             reexpansions, tolerance, recalibrate, progress)
    except ValueError as error:
        _fail(str(error))
    protected = _inputs_of(model, task, source, weights)
    try:
        if report_path:
            _check_output_file(report_path, "--report", protected, out, force)
        if out:  # in every process, so that a refusal stops them all before they wait on each other
            _check_output_dir(out)
            prepare_output_dir(out, force=force, protected=protected)
        inputs = _example_inputs(source, task_obj, input_shape)
        compressed, report = compress_model(
            source.model, selector, task=task_obj, example_inputs=inputs, decomposition=decomposition,
            ignore=list(ignore), round_to=round_to, progress=progress, latency_guard=latency_guard,
            evaluate_split=None if split == "none" or task_obj is None else split, cache_dir=cache_dir,
            low_memory=low_memory, inplace=low_memory, randomized_above=randomized_above,
            recalibrate=bool(recalibrate) and not selector.needs_data, recalibration_samples=calibration_samples)
    except (ValueError, CheckpointError) as error:
        _fail(str(error))
    if not main_process:
        return
    if task:
        report.plan.meta["task"] = task
    elif source.task is not None:
        report.plan.meta["task"] = source.task.name
    click.echo(report.plan.table())
    click.echo("")
    click.echo(report.summary())
    if out:
        save(compressed, out, report=report, force=True, source=source.spec or None, protected=protected,
             carry_from=source.files_dir)
        click.echo(f"saved to {out}")
    if report_path:
        write_text_atomic(Path(report_path), json.dumps(report.to_dict(), indent=2))
        click.echo(f"report written to {report_path}")


def _selector(select: str, target: str | None, calibration_samples: int, batch_size: int,
              probe_samples: int | None, confidence: float, reexpansions: int, tolerance: float,
              recalibrate: bool | None, progress: bool) -> Selector:
    """The selector for ``--select`` (with ``--target`` for lossless), or a clear error."""
    kind = select.partition(":")[0].strip().lower()
    if kind not in ("lossless", "compact"):
        if target:
            raise ValueError("--target goes with --select lossless (e.g. --select lossless --target params=0.3)")
        unused = [name for name in ("probe_samples", "confidence", "reexpansions", "tolerance", "batch_size")
                  if _given(name)]
        if _given("calibration_samples") and not recalibrate:
            unused.append("calibration_samples")
        if unused:
            options = ", ".join("--" + name.replace("_", "-") for name in unused)
            raise ValueError(f"{options}: only --select lossless/compact use these (--calibration-samples also goes "
                             f"with --recalibrate); --select {select} reads only the weights")
        return parse_selector(select)
    if kind == "lossless" and target:
        if ":" in select:
            raise ValueError("give the size either in --select lossless:params=F or in --target, not both")
        select = f"lossless:{target}"
    if kind == "compact" and target:
        raise ValueError("compact finds its own size (the smallest with no loss); drop --target or use lossless")
    if kind == "compact" and _given("reexpansions"):
        raise ValueError("--reexpansions goes with --select lossless: compact walks one path from the original model")
    if kind == "lossless" and _given("tolerance"):
        raise ValueError("--tolerance goes with --select compact: lossless keeps a size and seeks the lowest loss")
    selector = parse_selector(select)
    metric = selector.metric
    return LossAware(selector.mode, selector.fraction, metric, calibration_samples=calibration_samples,
                     batch_size=batch_size, probe_samples=probe_samples, confidence=confidence,
                     criterion=selector.criterion, recalibrate=recalibrate is not False, reexpansions=reexpansions,
                     tolerance=tolerance, progress=progress)


def _given(option: str) -> bool:
    """Whether the user set this option of the running command (on the command line or in the environment)."""
    source = click.get_current_context().get_parameter_source(option)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@main.command(name="eval", help="Evaluate a model on a task split.")
@_model_argument
@_weights_option
@_task_option
@_device_option
@_trust_option
@click.option("--split", default="test", show_default=True)
def evaluate(model: str, weights: str | None, task: str | None, device: str, trust_source: bool, split: str) -> None:
    source, task_obj = _load(model, weights, task, device, trust_source)
    if task_obj is None:
        _fail(f"this model has no default task: pass --task{_untrusted_task_hint(source)}")
    try:
        run_example(source.model, task_obj.example_inputs())  # a task made for another model fails clearly
        metrics = task_obj.evaluate(source.model, split)
    except ValueError as error:
        _fail(str(error))
    click.echo(f"{task_obj.name} ({split}): " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    click.echo(f"params: {count_params(source.model):,}")


@main.command(help="Latency before/after on --device: a saved directory against its source, or MODEL against "
                   "--select.")
@_model_options
@click.option("--select", default="fixed:0.5", show_default=True, help="Selector when MODEL is not a saved directory.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 32), show_default=True)
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1))
def bench(model: str, weights: str | None, task: str | None, input_shape: str | None, device: str,
          trust_source: bool, select: str, batches: tuple[int, ...], repeats: int) -> None:
    source, task_obj = _load(model, weights, task, device, trust_source)
    inputs = _example_inputs(source, task_obj, input_shape)
    if inputs is None:
        _fail(f"no example inputs: pass --task or --input-shape{_untrusted_task_hint(source)}")
    try:
        if source.checkpoint is not None:
            spec = checked_spec(source.spec, source.checkpoint, "source", trust_source)
            if spec is None:
                raise CheckpointError(f"{source.checkpoint} records no source model to time against")
            original, compressed = build_source_model(spec).to(device), source.model
        else:
            original = source.model
            compressed, _ = compress_model(original, select, task=task_obj, example_inputs=inputs, progress=False)
    except (ValueError, CheckpointError) as error:
        _fail(str(error))
    results = compare_latency({"original": original, "compressed": compressed}, inputs, tuple(batches), repeats)
    rows = [("batch", "original ms", "compressed ms", "speed-up")]
    for batch, times in results.items():
        rows.append((str(batch), f"{times['original'] * 1e3:.2f}", f"{times['compressed'] * 1e3:.2f}",
                     f"{times['original'] / times['compressed']:.2f}x"))
    click.echo(format_table(rows))
    click.echo(f"median of {repeats} runs, {torch.get_num_threads()} threads; params "
               f"{count_params(original):,} -> {count_params(compressed):,}")


@main.command(help="Train a Fashion-MNIST reference CNN (optionally over-parameterized with orthogonal "
                   "regularization), collapse it, compress it (EVBMF ranks by default) and fine-tune. Re-running "
                   "the same command resumes an interrupted run.")
@click.argument("task")
@click.option("--model", "model_name", required=True, help="Reference CNN: resnet20, resnet56, resnext or vgg.")
@click.option("--epochs", required=True, type=int, help="Training epochs (one-cycle schedule).")
@click.option("--overparam", type=float, help="Train each layer as U·diag(s)·Vᵀ with this width factor (≥ 1).")
@click.option("--orth", default=0.0, show_default=True, type=float, help="Weight λ of the orthogonality penalty.")
@click.option("--sparsity", default=0.0, show_default=True, type=float, help="Weight μ of the spectrum-spread term.")
@click.option("--select", default="evbmf", show_default=True, help="Selector that compresses the trained model.")
@click.option("--decomposition", default="auto", show_default=True, help=DECOMPOSITION_HELP)
@click.option("--round-to", default=1, show_default=True, type=int, help="Round ranks to a multiple of N.")
@click.option("--finetune-epochs", default=0, show_default=True, type=int, help="Fine-tune epochs after compressing.")
@click.option("--finetune-lr", default=0.01, show_default=True, type=float)
@click.option("--lr", default=0.1, show_default=True, type=float, help="Peak learning rate.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-subset", type=int, help="Train on the first N training images only (smoke runs).")
@click.option("--device", default="cpu", show_default=True, help="Where to train: cpu, cuda, cuda:1, mps…")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoints of every step and state.json.")
def train(task: str, model_name: str, out: str, device: str, **settings) -> None:
    from rankcut.training.pipeline import TrainConfig, TrainingRun

    if task != "fashion-mnist":
        _fail(f"rankcut train knows the task 'fashion-mnist' (got {task!r}); for your own model, use "
              "rankcut.overparameterize, OrthogonalRegularizer and collapse in your training loop")
    try:
        run = TrainingRun(TrainConfig(model=model_name, **settings), out, device=device, log=click.echo)
        run.run()
    except ValueError as error:
        _fail(str(error))
