"""Find a model's factorizable layers, what stops the others, and how many positions each layer sees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from rankcut.bases import BasisStore
from rankcut.layers import Decomposition, Factorized, LayerInfo, describe_layer, get_decomposition
from rankcut.layers.info import kernel_of
from rankcut.tasks.base import ModelInputs, run_example

IgnoreSpec = Sequence[str | type[nn.Module]] | str | type[nn.Module]
DecompositionSpec = str | Mapping[str, str]


@dataclass
class Candidate:
    """A layer rankcut knows how to factorize, the decomposition chosen for it, or why it is kept dense."""

    info: LayerInfo
    module: nn.Module
    decomposition: Decomposition
    skip_reason: str | None = None
    bases: dict[str, Any] = field(default_factory=dict, repr=False)
    store: BasisStore = field(default_factory=BasisStore, repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    def basis(self, decomposition: Decomposition | None = None) -> Any:
        """The layer's basis for ``decomposition`` (default: its own), from the store once, then kept."""
        decomposition = decomposition or self.decomposition
        if decomposition.name not in self.bases:
            kernel = kernel_of(self.module, self.info)
            if kernel.is_meta:
                raise ValueError(f"layer {self.name!r} is on the meta device (no values): load the weights first, "
                                 "e.g. model.to_empty(device='cpu') then load_state_dict, or from_pretrained")
            if not torch.isfinite(kernel).all():
                raise ValueError(f"layer {self.name!r} has NaN or Inf weights; fix the model before compressing")
            self.bases[decomposition.name] = self.store.basis(self.info, decomposition, kernel)
        return self.bases[decomposition.name]

    def adopt_basis(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the layer's basis as computed elsewhere (another process), through the store."""
        kernel = kernel_of(self.module, self.info)
        self.bases[self.decomposition.name] = self.store.adopt(self.info, self.decomposition, kernel, tensors)

    @property
    def rank_limit(self) -> int | None:
        """The largest rank the layer's basis holds when it is partial (a randomized SVD), else None."""
        if self.store.leading(self.info, self.decomposition) is None:
            return None
        spectrum = self.basis()
        return None if spectrum.complete else spectrum.max_rank


@dataclass
class Inventory:
    """Every supported layer of a model (``candidates``) and the parameterized modules rankcut leaves alone."""

    candidates: list[Candidate]
    other_modules: list[tuple[str, str, int]]  # (name, type, own params) of modules of unsupported types

    def factorizable(self) -> list[Candidate]:
        return [c for c in self.candidates if c.skip_reason is None]


def resolve_decomposition(spec: DecompositionSpec, info: LayerInfo) -> Decomposition:
    """The decomposition for one layer: a name for all layers, "auto", or a mapping by layer name or kind."""
    if isinstance(spec, Mapping):
        name = spec.get(info.name) or spec.get(info.kind) or spec.get("default", "auto")
    else:
        name = spec
    if not isinstance(name, str):
        raise TypeError(f"decomposition must be a name (svd, tucker2, whitened-svd or auto) or a mapping of layer "
                        f"names or kinds to names, got {name!r} for layer {info.name!r}")
    if name == "auto":
        name = "tucker2" if info.is_conv and info.kernel_volume > 1 and info.in_per_group > 1 else "svd"
    return decomposition_named(name)


def decomposition_named(name: str) -> Decomposition:
    """A registered decomposition by name; the error also offers "auto", which ``resolve_decomposition`` reads."""
    try:
        return get_decomposition(name)
    except ValueError as error:
        raise ValueError(f"{error}, or auto") from None


def _owner_reasons(model: nn.Module) -> dict[str, str]:
    """Layers whose weights are read by their parent directly (so they cannot be swapped) or already factorized."""
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_modules():
                if child:
                    reasons[prefix + child] = "inside nn.MultiheadAttention, which reads its weights directly"
        if isinstance(module, Factorized):
            for child, _ in module.named_modules():
                if child:
                    reasons[prefix + child] = "already a factor of a factorized layer"
    return reasons


def _shared_weight_reasons(model: nn.Module) -> dict[str, str]:
    """Layers whose weight tensor is also used by another module (tied weights)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(weight, torch.Tensor):
            users.setdefault(id(weight), []).append(name)
    reasons = {}
    for names in users.values():
        for name in names if len(names) > 1 else ():
            others = ", ".join(repr(n) for n in names if n != name)
            reasons[name] = f"weight is tied to {others}; factorizing it would untie and grow the model"
    return reasons


def _parametrized_reason(module: nn.Module) -> str:
    """Why a parametrized layer is kept: rankcut's own training factors, or someone else's parametrization."""
    from rankcut.training.overparam import LowRankProduct  # the training package imports this module

    parametrizations = getattr(module.parametrizations, "weight", [])
    if any(isinstance(p, LowRankProduct) for p in parametrizations):
        return "over-parameterized for training; fold it back with rankcut.collapse(model) before compressing"
    return "weight is parametrized (e.g. weight_norm); remove the parametrization first"


def _ignore_matcher(model: nn.Module, ignore: IgnoreSpec) -> tuple[set[str], tuple[type, ...]]:
    """Split ``ignore`` into module names and module types, refusing entries that match nothing."""
    if ignore is None:
        ignore = ()
    if isinstance(ignore, (str, type)):  # one entry, not a sequence of characters
        ignore = (ignore,)
    names = dict(model.named_modules())
    type_names = {type(m).__name__ for m in names.values()}
    ignored_names, ignored_types = set(), []
    for entry in ignore:
        if entry == "":
            raise ValueError("ignore: '' names no layer (it is the whole model's name); give layer names or types")
        if isinstance(entry, type):
            ignored_types.append(entry)
        elif entry in names:
            ignored_names.add(entry)
        elif entry in type_names:
            ignored_types.extend({type(m) for m in names.values() if type(m).__name__ == entry})
        else:
            raise ValueError(
                f"ignore: {entry!r} is neither a module name nor a module type of this model "
                "(use names as printed by `rankcut inspect`, e.g. 'encoder.layer.0.attention', or types like 'Conv2d')"
            )
    return ignored_names, tuple(ignored_types)


def _is_ignored(name: str, module: nn.Module, names: set[str], types: tuple[type, ...]) -> bool:
    return isinstance(module, types) or any(name == n or name.startswith(n + ".") for n in names)


def measure_positions(model: nn.Module, modules: Mapping[str, nn.Module],
                      example_inputs: ModelInputs) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """Per layer: input and output positions (tokens × batch, or pixels × batch) in one forward pass, and the
    shape of the layer's first input (what its latency is measured on)."""
    seen: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    def hook(name: str, info_channels: tuple[int, int]):
        def record(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            n_in, n_out = info_channels
            before = seen.get(name, (0, 0, tuple(inputs[0].shape)))
            seen[name] = (before[0] + inputs[0].numel() // n_in, before[1] + output.numel() // n_out, before[2])
        return record

    handles = []
    for name, module in modules.items():
        info = describe_layer(name, module)
        handles.append(module.register_forward_hook(hook(name, (info.in_channels, info.out_channels))))
    try:
        run_example(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def scan(model: nn.Module, example_inputs: ModelInputs | None = None, decomposition: DecompositionSpec = "svd",
         ignore: IgnoreSpec = (), store: BasisStore | None = None) -> Inventory:
    """Describe every layer of ``model``: candidates for factorization (with reasons for those kept) and others.

    ``store`` says where the layers' bases come from (disk cache, low memory, randomized SVD).
    """
    store = store or BasisStore()
    ignored_names, ignored_types = _ignore_matcher(model, ignore)
    owner_reasons = _owner_reasons(model)
    shared_reasons = _shared_weight_reasons(model)
    candidates, others, layer_modules = [], [], {}
    for name, module in model.named_modules():
        info = describe_layer(name, module)
        if info is None:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if own and not isinstance(module, Factorized):
                others.append((name, type(module).__name__, own))
            continue
        layer_modules[name] = module
        decomp = resolve_decomposition(decomposition, info)
        if _is_ignored(name, module, ignored_names, ignored_types):
            reason = "ignored by request"
        elif parametrize.is_parametrized(module):
            reason = _parametrized_reason(module)
        else:
            reason = owner_reasons.get(name) or shared_reasons.get(name) or decomp.unsupported_reason(info)
        candidates.append(Candidate(info, module, decomp, reason, store=store))
    if example_inputs is not None and layer_modules:
        positions = measure_positions(model, layer_modules, example_inputs)
        for candidate in candidates:
            n_in, n_out, shape = positions.get(candidate.name, (0, 0, ()))
            candidate.info = candidate.info.with_positions(n_in, n_out, shape)
    return Inventory(candidates, others)
