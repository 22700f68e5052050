"""Save and load compressed models as safetensors plus the plan: no pickles, atomic writes, checked on load."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from rankcut import hf
from rankcut.api import PLAN_ATTRIBUTE, build_skeleton, plan_of
from rankcut.plan import Plan
from rankcut.report import Report

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read back faithfully."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a half-written file."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def prepare_output_dir(out_dir: str | os.PathLike, *, force: bool = False,
                       protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Create ``out_dir``; refuse a non-empty one unless ``force``, and never one holding a ``protected`` input."""
    out = Path(out_dir).resolve()
    for item in protected:
        source = Path(item).resolve()
        if source == out or out in source.parents:
            raise CheckpointError(f"refusing to write into {out}: it holds the input {source}; choose another --out")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} is not empty; choose an empty directory or pass force=True (--force)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(model: nn.Module, out_dir: str | os.PathLike, *, report: Report | None = None, force: bool = False,
         source: str | None = None, protected: tuple[str | os.PathLike, ...] = (),
         carry_from: str | os.PathLike | None = None) -> Path:
    """Write ``model.safetensors``, ``plan.json`` (and ``report.json``) for a compressed model into ``out_dir``.

    ``source`` records how to rebuild the uncompressed model (a zoo name or ``module:factory``) so that
    ``load(out_dir)`` can work without one. A transformers model also gets its ``config.json``, which is
    what ``load`` rebuilds it from; ``carry_from`` (its input directory) lends the tokenizer and other files.
    """
    plan = plan_of(model)
    out = prepare_output_dir(out_dir, force=force, protected=protected)
    if carry_from is not None:
        hf.carry_files(carry_from, out)
    if hf.is_hf_model(model):
        hf.write_config(model, out)
        plan.meta = {**plan.meta, "format": hf.FORMAT, "architecture": type(model).__name__}
    weights = out / WEIGHTS_FILE
    atomic_write(weights, lambda temporary: save_model(model, temporary, metadata={"format": "pt"}))
    plan.meta = {**plan.meta, "weights": WEIGHTS_FILE, "weights_sha256": _sha256(weights)}
    if source is not None:
        plan.meta["source"] = source
    write_text_atomic(out / PLAN_FILE, plan.to_json())
    if report is not None:
        write_text_atomic(out / REPORT_FILE, json.dumps(report.to_dict(), indent=2))
    return out


def read_plan(checkpoint_dir: str | os.PathLike) -> Plan:
    """The plan stored in a checkpoint directory."""
    path = Path(checkpoint_dir) / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(checkpoint_dir)} is not a rankcut checkpoint: {PLAN_FILE} is missing")
    try:
        return Plan.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def _read_weights(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if expected_sha256 and _sha256(path) != expected_sha256:
        raise CheckpointError(f"{path} does not match the checksum in {PLAN_FILE}: the file is corrupted or was "
                              "replaced")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupted or truncated: {error}") from None


def _stored_names(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """For every state key, the stored name holding it: safetensors stores tied tensors once, under one name."""
    tied: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride()) if tensor.numel() else (key,)
        tied.setdefault(identity, []).append(key)
    names = {}
    for keys in tied.values():
        stored = next((key for key in keys if key in state), None)
        names.update({key: stored for key in keys if stored is not None})
    return names


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` strictly into ``model``, with errors that name the layer."""
    expected = model.state_dict()
    stored = _stored_names(expected, state)
    missing = [key for key in expected if key not in stored]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model rebuilt from the plan: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        value = state[stored[key]]
        if tuple(value.shape) != tuple(tensor.shape):
            layer = key.rsplit(".", 1)[0]
            raise CheckpointError(f"{path}: layer {layer!r} tensor {key!r} has shape {tuple(value.shape)}, the plan "
                                  f"needs {tuple(tensor.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {key!r} has NaN or Inf values")
    model.load_state_dict({key: state[stored[key]] for key in expected}, strict=True)


def checked_spec(spec: Any, directory: Path, field: str, trust_source: bool) -> str | None:
    """A checkpoint's recorded ``source`` model or ``task`` (``plan.meta[field]``), checked: importing a
    ``module:function`` runs that module's code, so one read from a checkpoint is used only on trust."""
    from rankcut.sources import is_module_spec  # sources builds models; it imports this module

    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        raise CheckpointError(f"{directory / PLAN_FILE}: meta.{field} must be a string, got {type(spec).__name__}")
    if is_module_spec(spec) and not trust_source:
        instead = ("pass model= (an uncompressed instance you build)" if field == "source"
                   else "pass the task yourself (task=... in Python, --task on the command line)")
        raise CheckpointError(f"{directory / PLAN_FILE} names the {field} {spec!r}: importing it would run that "
                              f"module's code; {instead}, or, if you trust this checkpoint, trust_source=True in "
                              "Python, --trust-source on the command line")
    return spec


def _weights_path(directory: Path, plan: Plan) -> Path:
    """The checkpoint's weights file: a file name inside the directory (a plan cannot point elsewhere)."""
    name = plan.meta.get("weights", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{directory / PLAN_FILE}: meta.weights must name a file in the checkpoint directory "
                              f"(e.g. {WEIGHTS_FILE!r}), got {name!r}")
    return directory / name


def load(checkpoint_dir: str | os.PathLike, model: nn.Module | None = None, *,
         trust_source: bool = False) -> nn.Module:
    """Rebuild a compressed model: the plan reshapes ``model`` (uncompressed, same architecture), then weights load.

    Without ``model``, the uncompressed model is rebuilt from the directory's ``config.json`` (transformers
    models) or from the plan's recorded ``source``: a zoo name, or a ``module:factory`` only with
    ``trust_source=True``, since importing it runs code. Weights are read with safetensors only; nothing is
    unpickled. If the checkpoint is refused, ``model`` is given back as it came.
    """
    directory = Path(checkpoint_dir)
    plan = read_plan(directory)
    for field in ("architecture", "weights_sha256"):
        if not isinstance(plan.meta.get(field, ""), str):
            raise CheckpointError(f"{directory / PLAN_FILE}: meta.{field} must be a string, got "
                                  f"{type(plan.meta[field]).__name__}")
    if model is None and plan.meta.get("format") == hf.FORMAT:
        model = hf.build_from_config(directory, plan.meta.get("architecture"))
    if model is None:
        from rankcut.sources import build_source_model  # a saved source is only needed on this path

        source = checked_spec(plan.meta.get("source"), directory, "source", trust_source)
        if source is None:
            raise CheckpointError(f"{directory} records no source model; pass model= (an uncompressed instance)")
        model = build_source_model(source)
    path = _weights_path(directory, plan)
    state = _read_weights(path, plan.meta.get("weights_sha256"))
    modules, attached = dict(model.named_modules()), getattr(model, PLAN_ATTRIBUTE, None)
    try:
        build_skeleton(model, plan)
        _load_state(model, state, path)
    except BaseException:
        _restore(model, modules, attached)
        raise
    return model.eval()


def _restore(model: nn.Module, modules: dict[str, nn.Module], plan: Plan | None) -> None:
    """Put back the modules a failed load replaced (by name, shallowest first) and the plan the model carried."""
    for name in sorted(modules, key=lambda name: name.count(".")):
        if name and model.get_submodule(name) is not modules[name]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, modules[name])
    if plan is not None:
        setattr(model, PLAN_ATTRIBUTE, plan)
    elif hasattr(model, PLAN_ATTRIBUTE):
        delattr(model, PLAN_ATTRIBUTE)
