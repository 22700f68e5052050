"""The whole-model API: plan, apply and compress."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from rankcut import hf
from rankcut.bases import BasisStore
from rankcut.counting import count_macs, count_params
from rankcut.devices import exact_float32
from rankcut.distributed import Group
from rankcut.input_statistics import input_grams
from rankcut.inventory import Candidate, DecompositionSpec, IgnoreSpec, Inventory, scan
from rankcut.latency import LatencyGuard
from rankcut.layers import Components, Decomposition, Factorized, LayerInfo, Rank, get_decomposition
from rankcut.plan import LayerPlan, Plan
from rankcut.recalibration import BatchNormRecalibration, batch_norms
from rankcut.report import Report
from rankcut.selectors import Choice, RankPolicy, Selector, parse_selector
from rankcut.tasks.base import (
    BATCH_SIZE,
    CALIBRATION_SAMPLES,
    PASS_EXAMPLE_INPUTS,
    ModelInputs,
    Task,
    describe_inputs,
    require_task,
)

PLAN_ATTRIBUTE = "_rankcut_plan"


def plan_of(model: nn.Module) -> Plan:
    """The plan a compressed model was made with (attached by ``compress``, ``apply`` and ``load``)."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise ValueError("this model carries no rankcut plan: make it with rankcut.compress, apply or load")
    return plan


def _layer_plan(candidate: Candidate, choice: Choice | None) -> LayerPlan:
    info, decomposition = candidate.info, candidate.decomposition
    rank = choice.rank if choice is not None else None
    reason = candidate.skip_reason or (choice.reason if choice is not None else "not chosen")
    max_rank = decomposition.max_rank(info) if candidate.skip_reason is None else 0
    return LayerPlan(
        name=info.name, kind=info.kind, weight_shape=list(info.weight_shape), groups=info.groups,
        decomposition=decomposition.name, rank=rank, max_rank=max_rank, reason=reason,
        supported=candidate.skip_reason is None,
        params_before=info.dense_params,
        params_after=decomposition.params(info, rank) if rank is not None else info.dense_params,
        macs_before=info.dense_macs,
        macs_after=decomposition.macs(info, rank) if rank is not None else info.dense_macs,
        components=_as_lists(choice.components) if choice is not None and choice.components is not None else None,
    )


def _as_lists(components: Components) -> list[int] | list[list[int]]:
    """Kept components as JSON-ready lists (tucker2 keeps one list per channel mode)."""
    return [list(mode) if isinstance(mode, tuple) else mode for mode in components]


@exact_float32()  # plans, factors and their checks in float32 as written: no TF32 or bfloat16 products
def make_plan(model: nn.Module, select: str | Selector = "fixed:0.5", *, example_inputs: ModelInputs | None = None,
              decomposition: DecompositionSpec = "svd", ignore: IgnoreSpec = (), round_to: int = 1,
              inventory: Inventory | None = None, task: Task | None = None,
              latency_guard: bool | LatencyGuard = False, store: BasisStore | None = None,
              whitening_samples: int = CALIBRATION_SAMPLES, progress: bool = False) -> Plan:
    """Choose a rank for every factorizable layer of ``model``, without changing it.

    Loss-aware selectors (``lossless``, ``compact``) measure ``model`` on ``task``'s calibration and
    validation splits; the others only read the weights. ``latency_guard`` also keeps dense every layer
    whose factors measured no faster than it on this machine, on the example inputs' shapes. ``store``
    says where layer bases come from (see ``BasisStore``: disk cache, low memory, randomized SVD). Under
    ``torchrun`` the processes share the work and all reach this same plan. A decomposition that whitens by
    the inputs (``whitened-svd``) reads them on ``task``'s first ``whitening_samples`` calibration samples.
    """
    _require_module(model)
    _refuse_compressed(model)
    selector = _selector(select, progress)
    if task is not None:
        require_task(task, "task")
    if example_inputs is None and task is not None:
        example_inputs = task.example_inputs()
    if latency_guard and example_inputs is None:
        raise ValueError(f"latency_guard times each layer on its input shape: {PASS_EXAMPLE_INPUTS}")
    guard = (latency_guard if isinstance(latency_guard, LatencyGuard) else LatencyGuard()) if latency_guard else None
    policy = RankPolicy(round_to=round_to, break_even=selector.uses_break_even, latency=guard)
    inventory = inventory or scan(model, example_inputs, decomposition, ignore, store)
    group = Group.current()
    if guard is not None and group.world > 1:
        raise ValueError("latency_guard times layers in each process, and timings differ between processes: "
                         "run it in a single process, not under torchrun")
    gather_inputs(model, [c for c in inventory.factorizable() if c.decomposition.needs_inputs], task,
                  whitening_samples)
    prepare_bases(inventory.factorizable(), group, progress)
    if selector.needs_data:
        if task is None:
            raise ValueError(f"{selector.spec} chooses ranks from the model's loss: pass task=... or data=... "
                             "(a built-in task, or rankcut.LoaderTask(calibration_batches, validation_batches, "
                             "loss_fn) for your own data)")
        selector.bind(model, task)
    choices = selector.choose(inventory.factorizable(), policy)
    layers = [_layer_plan(c, choices.get(c.name)) for c in inventory.candidates]
    meta: dict = {"round_to": round_to, "latency_guard": guard is not None, "processes": group.world}
    if getattr(selector, "summary", None):
        meta["selection"] = selector.summary
    return Plan(layers, selector.spec, meta)


def _require_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _refuse_compressed(model: nn.Module) -> None:
    """Refuse a model rankcut has already factorized: its checkpoint is rebuilt from the original architecture and
    one plan, so a second plan (which would name the factors) could never be loaded back."""
    done = [name for name, module in model.named_modules() if isinstance(module, Factorized)]
    if done:
        raise ValueError(f"this model is already compressed ({len(done)} factorized layers, e.g. {done[0]!r}): "
                         "compress the original model instead, with the new selector (a second plan on top of the "
                         "first could not be saved and loaded back)")


def gather_inputs(model: nn.Module, candidates: Sequence[Candidate], task: Task | None, samples: int) -> None:
    """Give the layers whose decomposition needs inputs their inputs' Gram matrices, on ``task``'s first
    ``samples`` calibration samples (each layer once: a store keeps what it was given)."""
    missing = [c for c in candidates if c.name not in c.store.input_grams]
    if not missing:
        return
    first = missing[0]
    if task is None:
        raise ValueError(f"{first.decomposition.name} (layer {first.name!r}) whitens each layer by its calibration "
                         "inputs: pass a task (task=... or --task), or use a decomposition that reads only weights")
    if samples < 1:
        raise ValueError(f"whitening_samples must be positive, got {samples}")
    first.store.input_grams.update(input_grams(model, missing, task.calibration_batches(samples, BATCH_SIZE),
                                               task.loss))


def prepare_bases(candidates: Sequence[Candidate], group: Group, progress: bool = False) -> None:
    """Compute every layer's basis up front (with a progress bar); with several processes, each computes
    every ``world``-th layer's and broadcasts it to the others."""
    for index, candidate in enumerate(tqdm(candidates, desc="spectra", unit="layer", leave=False,
                                           disable=not progress or not candidates)):
        owner = group.owner(index)
        if group.world == 1:
            candidate.basis()
            continue
        tensors = group.broadcast_tensors(candidate.basis().tensors() if group.rank == owner else None, owner)
        if group.rank != owner:
            candidate.adopt_basis(tensors)


def _check_plan_matches(plan: Plan, candidates: Mapping[str, Candidate]) -> None:
    """Refuse a plan written for another architecture, naming the first layer that differs."""
    for layer in plan.layers:
        candidate = candidates.get(layer.name)
        if candidate is None:
            raise ValueError(f"plan does not fit this model: it has no layer {layer.name!r} "
                             f"(the plan was made for another architecture)")
        info = candidate.info
        if (layer.kind, list(layer.weight_shape), layer.groups) != (info.kind, list(info.weight_shape), info.groups):
            raise ValueError(
                f"plan does not fit this model at layer {layer.name!r}: plan has {layer.kind} "
                f"{layer.weight_shape} groups={layer.groups}, model has {info.kind} {list(info.weight_shape)} "
                f"groups={info.groups}"
            )
    missing = sorted(set(candidates) - {layer.name for layer in plan.layers})
    if missing:
        raise ValueError(f"plan does not fit this model: layers {missing[:5]} are not in the plan "
                         f"(the plan was made for another architecture)")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replace_layers(model: nn.Module, plan: Plan, candidates: Mapping[str, Candidate], *, fill: bool,
                    progress: bool) -> None:
    """Swap each planned layer of ``model`` for its factors (filled from the weights, or an empty skeleton)."""
    todo = plan.factorized()
    for layer in tqdm(todo, desc="factorizing", unit="layer", disable=not progress or not todo, leave=False):
        candidate = candidates[layer.name]
        if candidate.skip_reason is not None:
            raise ValueError(f"layer {layer.name!r} cannot be factorized: {candidate.skip_reason}")
        decomposition = get_decomposition(layer.decomposition)
        unsupported = decomposition.unsupported_reason(candidate.info)
        if unsupported:
            raise ValueError(f"layer {layer.name!r}: {unsupported}")
        rank: Rank = decomposition.check_rank(candidate.info, layer.rank)
        components = _checked_components(layer, decomposition, candidate.info, rank)
        if fill:
            basis = candidate.basis(decomposition)
            factors = decomposition.build(candidate.info, rank, basis, _bias(candidate.module), components)
            layer.relative_error = decomposition.relative_error(basis, rank, components)
        else:
            factors = decomposition.build(candidate.info, rank)
        _keep_frozen(candidate.module, factors)
        _set_module(model, layer.name, factors)


def _keep_frozen(dense: nn.Module, factors: nn.Module) -> None:
    """Give the factors the dense layer's ``requires_grad``: a weight the user froze stays frozen, and so does a
    frozen bias (carried by the last factor)."""
    factors.requires_grad_(dense.weight.requires_grad)
    bias = getattr(dense, "bias", None)
    if bias is not None:
        for module in factors.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(bias.requires_grad)


def _checked_components(layer: LayerPlan, decomposition: Decomposition, info: LayerInfo,
                        rank: Rank) -> Components | None:
    """The plan's kept components for a layer, after checking they fit the rank and the decomposition."""
    if layer.components is None:
        return None
    try:
        return decomposition.check_components(info, rank, layer.components)
    except ValueError as error:
        raise ValueError(f"layer {layer.name!r}: {error}") from None


def _bias(module: nn.Module):
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().double()


@exact_float32()
def apply(model: nn.Module, plan: Plan, *, inplace: bool = False, progress: bool = False,
          inventory: Inventory | None = None, task: Task | None = None,
          whitening_samples: int = CALIBRATION_SAMPLES) -> nn.Module:
    """Factorize ``model`` exactly as ``plan`` says (a copy unless ``inplace``); the plan is checked first.

    A plan with ``whitened-svd`` layers needs their calibration inputs: pass the ``task`` it was made with.
    """
    _require_module(model)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a rankcut Plan (rankcut.Plan.from_json(text) or rankcut.read_plan(dir) read "
                        f"one), got {type(plan).__name__}")
    inventory = inventory or scan(model)
    candidates = {c.name: c for c in inventory.candidates}
    _check_plan_matches(plan, candidates)
    planned = [replace(candidates[layer.name], decomposition=get_decomposition(layer.decomposition))
               for layer in plan.factorized()]  # the plan's decompositions, not scan's default
    gather_inputs(model, [c for c in planned if c.decomposition.needs_inputs], task, whitening_samples)
    target = model if inplace else copy.deepcopy(model)
    if not inplace:
        modules = dict(target.named_modules())
        candidates = {name: replace(c, module=modules[name]) for name, c in candidates.items()}
    _replace_layers(target, plan, candidates, fill=True, progress=progress)
    setattr(target, PLAN_ATTRIBUTE, plan)
    return target


def build_skeleton(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by empty factor modules of the planned ranks, for loading."""
    candidates = {c.name: c for c in scan(model).candidates}
    _check_plan_matches(plan, candidates)
    _replace_layers(model, plan, candidates, fill=False, progress=False)
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model


@exact_float32()
def compress(model: nn.Module, select: str | Selector = "fixed:0.5", *, task: Task | None = None,
             data: Task | None = None,
             example_inputs: ModelInputs | None = None, decomposition: DecompositionSpec = "svd",
             ignore: IgnoreSpec = (), round_to: int = 1, inplace: bool = False, progress: bool = True,
             evaluate_split: str | None = None, latency_guard: bool | LatencyGuard = False,
             cache_dir: str | os.PathLike | None = None, low_memory: bool = False,
             randomized_above: int | None = None, recalibrate: bool = False,
             recalibration_samples: int = CALIBRATION_SAMPLES,
             whitening_samples: int = CALIBRATION_SAMPLES) -> tuple[nn.Module, Report]:
    """Factorize ``model``'s layers with ranks from ``select``; return the compressed model and a report.

    ``select`` is a spec (``"fixed:0.5"`` keeps ~50% of each factorizable layer's params, ``"rank:32"``,
    ``"full"``) or a ``Selector``. ``example_inputs`` (or ``task.example_inputs()``, or token ids for a
    transformers model) let MACs be counted; with a ``task`` and ``evaluate_split`` the metric is measured
    before and after. The input model is left untouched unless ``inplace``. ``lossless``/``compact``
    measure the model on ``data`` (or ``task``): a built-in task or ``LoaderTask(calibration, validation,
    loss)`` built from your own batches.
    ``latency_guard=True`` keeps dense the layers whose factors would not run faster on this machine.
    Large models: ``cache_dir`` keeps spectra and loss statistics on disk for the next run, ``low_memory``
    keeps singular vectors on disk (pair it with ``inplace=True``), ``randomized_above`` gives layers with
    at least that many weights a checked randomized SVD of their leading components.
    ``recalibrate=True`` corrects the batch norms after a selector that reads only the weights (``budget``,
    ``fixed`` …), on the task's first ``recalibration_samples`` calibration samples (``rankcut.recalibration``:
    forward passes, no training). ``lossless``/``compact`` do this by themselves: see
    ``LossAware(recalibrate=)``. ``decomposition="whitened-svd"`` truncates each layer where its outputs on
    the task's first ``whitening_samples`` calibration samples change least (SVD-LLM's whitening).
    """
    _require_module(model)
    _refuse_compressed(model)  # before the original's evaluation, which may take a while
    if data is not None and task is not None and data is not task:
        raise ValueError("pass the task either as task= or as data=, not both")
    argument = "task" if task is not None else "data"
    task = task if task is not None else data
    if task is not None:
        require_task(task, argument)
    start = time.perf_counter()
    if example_inputs is None and task is not None:
        example_inputs = task.example_inputs()
    if example_inputs is None and hf.is_hf_model(model):
        example_inputs = hf.example_inputs(model)
    with _in_eval_mode(model, restore=not inplace):  # the caller's model gets its mode back
        store = BasisStore(cache_dir, low_memory=low_memory, randomized_above=randomized_above)
        inventory = scan(model, example_inputs, decomposition, ignore, store)
        selector = _selector(select, progress)
        recalibration = _recalibration(model, selector, task, recalibration_samples) if recalibrate else None
        # before the selection, so that a split the task lacks fails before minutes of work
        metrics_before = task.evaluate(model, evaluate_split) if task is not None and evaluate_split else {}
        plan = make_plan(model, selector, example_inputs=example_inputs, decomposition=decomposition, round_to=round_to,
                         inventory=inventory, task=task, latency_guard=latency_guard,
                         whitening_samples=whitening_samples, progress=progress)
        params_before = count_params(model)
        macs_before = count_macs(model, example_inputs) if example_inputs is not None else None
        compressed = apply(model, plan, inplace=inplace, progress=progress, inventory=inventory)
        finished = (selector.finish(compressed) if recalibration is None
                    else recalibration.finish(compressed))
        if finished is not None:
            plan.meta["after_factorization"] = finished
        plan.meta["bases"] = store.describe()
        report = Report(
            plan=plan, params_before=params_before, params_after=count_params(compressed),
            macs_before=macs_before,
            macs_after=count_macs(compressed, example_inputs) if example_inputs is not None else None,
            inputs=describe_inputs(example_inputs) if example_inputs is not None else "",
            metric_name=task.metric_name if metrics_before else None, metrics_before=metrics_before,
            metrics_after=task.evaluate(compressed, evaluate_split) if metrics_before else {},
            other_modules=inventory.other_modules,
        )
    report.seconds = time.perf_counter() - start
    return compressed, report


@contextmanager
def _in_eval_mode(model: nn.Module, restore: bool) -> Iterator[None]:
    """``model`` in eval mode within the block (scans, measurements and factors need it); afterwards back in the
    mode it was in, when ``restore``."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if restore:
            model.train(was_training)


def _selector(select: str | Selector, progress: bool) -> Selector:
    """The selector for ``select``; one made from a spec string shows progress bars only with ``progress``
    (a ``Selector`` object keeps its own setting)."""
    selector = parse_selector(select)
    if isinstance(select, str) and hasattr(selector, "progress"):
        selector.progress = progress
    return selector


def _recalibration(model: nn.Module, selector: Selector, task: Task | None, samples: int) -> BatchNormRecalibration:
    """The original's batch-norm statistics on the task's calibration samples, for ``compress(recalibrate=True)``."""
    if selector.needs_data:
        raise ValueError(f"{selector.spec} recalibrates batch norms by itself; turn it off with "
                         "LossAware(recalibrate=False) (--no-recalibrate), not compress(recalibrate=...)")
    if task is None:
        raise ValueError("recalibrate=True corrects batch-norm statistics on calibration samples: pass a task "
                         "(task=... or --task)")
    if not batch_norms(model):
        raise ValueError("recalibrate=True: the model has no batch norms with running statistics to correct")
    if samples < 1:
        raise ValueError(f"recalibration_samples must be positive, got {samples}")
    return BatchNormRecalibration(model, list(task.calibration_batches(samples, BATCH_SIZE)), task.loss)
