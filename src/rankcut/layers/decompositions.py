"""Registry of decompositions: each knows its ranks, its cost, and how to build factor modules for a layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankcut.layers.factorized import Factorized
from rankcut.layers.info import LayerInfo
from rankcut.linalg import Spectrum, Tucker2Factors, TuckerBasis

Rank = int | tuple[int, ...]
# kept components: singular triplet indices (svd), or one index tuple per channel mode (tucker2: out, in)
Components = tuple[int, ...] | tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Fit:
    """In place of kept components: the decomposition's own fit at ``rank``, what ``build`` makes without
    components (tucker2: HOOI; svd: the leading triplets). How a plan of plain ranks is measured."""

    rank: Rank


DECOMPOSITIONS: dict[str, Decomposition] = {}

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def get_decomposition(name: str) -> Decomposition:
    """The registered decomposition called ``name`` (case-insensitive)."""
    try:
        return DECOMPOSITIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown decomposition {name!r}; available: {', '.join(sorted(DECOMPOSITIONS))}") from None


def _depthwise_reason(info: LayerInfo) -> str | None:
    if info.is_conv and info.in_per_group == 1 and info.groups > 1:
        return "depthwise conv (one input channel per group): nothing to factorize across channels"
    return None


class Decomposition(ABC):
    """One way to factorize a layer. Subclasses register themselves under ``name``.

    A basis (the expensive part: an SVD or the unfoldings' spectra) is computed once per layer by ``basis``
    and reused for every rank the selectors try.
    """

    name: ClassVar[str]
    supports_components: ClassVar[bool] = False  # can keep any subset of components, not only the leading ones
    needs_inputs: ClassVar[bool] = False  # its basis also depends on the layer's calibration inputs

    def __init_subclass__(cls, *, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        DECOMPOSITIONS[name] = cls()

    @abstractmethod
    def unsupported_reason(self, info: LayerInfo) -> str | None:
        """Why this decomposition cannot factorize the layer, or None if it can."""

    @abstractmethod
    def max_rank(self, info: LayerInfo) -> Rank:
        """The full rank: factors of this rank reproduce the layer exactly."""

    @abstractmethod
    def params(self, info: LayerInfo, rank: Rank) -> int:
        """Parameters of the factorized layer (bias included)."""

    @abstractmethod
    def macs(self, info: LayerInfo, rank: Rank) -> int:
        """Multiply-accumulates of the factorized layer in one forward pass on the example inputs."""

    @abstractmethod
    def ranks_by_size(self, info: LayerInfo) -> list[Rank]:
        """Candidate ranks from smallest to largest, for searches over size."""

    @abstractmethod
    def basis(self, kernel: torch.Tensor, leading: int | None = None) -> Any:
        """The per-layer decomposition that every rank is sliced from (float64).

        ``leading``: compute only that many leading components, by a checked randomized SVD (svd only).
        """

    @abstractmethod
    def basis_from_tensors(self, tensors: dict[str, torch.Tensor],
                           loader: Callable[[str], torch.Tensor] | None = None) -> Any:
        """The basis whose ``tensors()`` these are; with ``loader``, large tensors are read on access."""

    @abstractmethod
    def relative_error(self, basis: Any, rank: Rank, components: Components | None = None) -> float:
        """‖W − W_r‖_F / ‖W‖_F of the rank-``rank`` factorization (of ``components`` when given)."""

    @abstractmethod
    def build(self, info: LayerInfo, rank: Rank, basis: Any = None, bias: torch.Tensor | None = None,
              components: Components | None = None) -> Factorized:
        """Factor modules for ``rank``: filled from ``basis``, or an empty skeleton to load weights into.

        ``components`` keeps chosen singular triplets instead of the leading ones (``supports_components``).
        """

    @abstractmethod
    def spectra(self, basis: Any) -> list[Spectrum]:
        """One spectrum per rank component (SVD: the matrix's; Tucker-2: the output and input unfoldings')."""

    def basis_from_inputs(self, kernel: torch.Tensor, gram: torch.Tensor) -> Any:
        """The basis of a decomposition that ``needs_inputs``, from the weights and the inputs' Gram matrix."""
        raise ValueError(f"{self.name} reads only the weights; call basis(kernel)")

    def leading_components(self, rank: Rank) -> Components:
        """The kept components of plain truncation at ``rank`` (``supports_components`` decompositions)."""
        raise ValueError(f"{self.name} keeps leading components only; a component subset needs svd or tucker2")

    def check_components(self, info: LayerInfo, rank: Rank, components: Any) -> Components:
        """``components`` in canonical form (tuples), or a ValueError saying what a valid list looks like."""
        raise ValueError(f"the plan keeps a subset of components, which {self.name} cannot do (svd and tucker2 can)")

    def plan_components(self, rank: Rank, components: Components | Fit) -> Components | None:
        """What a plan records: None when building without ``components`` gives the same weights."""
        return None if isinstance(components, Fit) else components

    def reconstruct(self, basis: Any, components: Components | Fit) -> torch.Tensor:
        """The weight that keeps ``components`` (or ``Fit``), as (g, out/g, in/g·k) matrices (float64)."""
        raise ValueError(f"{self.name} cannot rebuild a weight from a component subset")

    def rank_from_parts(self, parts: list[int]) -> Rank:
        """A rank from one value per spectrum (an int when there is one)."""
        return parts[0] if len(parts) == 1 else tuple(parts)

    def squared_error_estimate(self, basis: Any, rank: Rank) -> float:
        """Σ of the spectra's dropped energy fractions: exactly ‖W − W_r‖²/‖W‖² for SVD, an upper bound for Tucker-2."""
        parts = (rank,) if isinstance(rank, int) else rank
        return sum(float(1 - s.energy()[r - 1]) for s, r in zip(self.spectra(basis), parts, strict=True))

    def check_rank(self, info: LayerInfo, rank: Rank) -> Rank:
        """``rank`` in canonical form, or a ValueError naming the layer and the valid range."""
        full = self.max_rank(info)
        parts = (rank,) if isinstance(full, int) else tuple(rank) if isinstance(rank, (tuple, list)) else None
        limits = (full,) if isinstance(full, int) else full
        if parts is None or len(parts) != len(limits) or not all(isinstance(p, int) for p in parts):
            raise ValueError(f"layer {info.name!r}: {self.name} needs a rank like {full!r}, got {rank!r}")
        if not all(1 <= p <= limit for p, limit in zip(parts, limits, strict=True)):
            raise ValueError(
                f"layer {info.name!r}: {self.name} rank {rank!r} is out of range; it must be between 1 and "
                f"{full!r} (the layer's full rank)"
            )
        return parts[0] if isinstance(full, int) else tuple(parts)

    def rank_for_params(self, info: LayerInfo, budget: int) -> Rank | None:
        """The largest candidate rank whose params fit in ``budget``, or None if none does."""
        best = None
        for rank in self.ranks_by_size(info):
            if self.params(info, rank) > budget:
                break
            best = rank
        return best

    def pays_off(self, info: LayerInfo, rank: Rank) -> bool:
        """True when the factorized layer has fewer params and (when measured) fewer MACs than the dense one."""
        if self.params(info, rank) >= info.dense_params:
            return False
        return info.output_positions == 0 or self.macs(info, rank) < info.dense_macs


def _index_list(values: Any, rank: int, limit: int) -> tuple[int, ...] | None:
    """``values`` as a tuple of ``rank`` distinct indices in [0, limit), or None when it is not one."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < limit for i in values):
        return None
    return tuple(values) if len(set(values)) == len(values) == rank else None


def _conv(info: LayerInfo, n_in: int, n_out: int, kernel: tuple[int, ...] | None, bias: bool) -> nn.Module:
    """A ConvNd like the layer's own (``kernel`` None: a 1x1 pointwise conv with the layer's groups)."""
    conv_type = _CONV_TYPES[info.spatial_dims]
    if kernel is None:
        return conv_type(n_in, n_out, 1, groups=info.groups, bias=bias, dtype=info.dtype, device=info.device)
    return conv_type(
        n_in, n_out, kernel, groups=info.groups, bias=bias, dtype=info.dtype, device=info.device, **info.conv_options
    )


def dense_module(info: LayerInfo) -> nn.Module:
    """A dense layer computing what ``info``'s layer computes (fresh random weights), e.g. to time it."""
    options = {"dtype": info.dtype, "device": info.device}
    if not info.is_conv:  # Linear and HF Conv1D do the same matrix product
        return nn.Linear(info.in_channels, info.out_channels, bias=info.has_bias, **options)
    return _CONV_TYPES[info.spatial_dims](info.in_channels, info.out_channels, info.kernel_size, groups=info.groups,
                                          bias=info.has_bias, **info.conv_options, **options)


def _fill(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """Copy float64 factors into a module, cast to its dtype."""
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias is not None:
            module.bias.copy_(bias)
    return module


class SVD(Decomposition, name="svd"):
    """Truncated SVD: Linear → Linear(n→r) · Linear(r→m); conv → k×k conv to r channels · 1×1 conv (per group)."""

    supports_components = True

    def unsupported_reason(self, info: LayerInfo) -> str | None:
        return _depthwise_reason(info)

    def max_rank(self, info: LayerInfo) -> int:
        return min(info.out_per_group, info.in_per_group * info.kernel_volume)

    def params(self, info: LayerInfo, rank: Rank) -> int:
        bias = info.out_channels if info.has_bias else 0
        return rank * (info.in_channels * info.kernel_volume + info.out_channels) + bias

    def macs(self, info: LayerInfo, rank: Rank) -> int:
        return info.output_positions * rank * (info.in_channels * info.kernel_volume + info.out_channels)

    def ranks_by_size(self, info: LayerInfo) -> list[int]:
        return list(range(1, self.max_rank(info) + 1))

    def rank_for_params(self, info: LayerInfo, budget: int) -> int | None:
        per_rank = info.in_channels * info.kernel_volume + info.out_channels
        rank = min((budget - (info.out_channels if info.has_bias else 0)) // per_rank, self.max_rank(info))
        return rank if rank >= 1 else None

    def basis(self, kernel: torch.Tensor, leading: int | None = None) -> Spectrum:
        matrices = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
        return Spectrum.of(matrices) if leading is None else Spectrum.randomized(matrices, leading)

    def basis_from_tensors(self, tensors: dict[str, torch.Tensor],
                           loader: Callable[[str], torch.Tensor] | None = None) -> Spectrum:
        return Spectrum.from_tensors(tensors, loader)

    def relative_error(self, basis: Spectrum, rank: Rank, components: Components | None = None) -> float:
        return basis.relative_error(rank) if components is None else basis.kept_error(components)

    def spectra(self, basis: Spectrum) -> list[Spectrum]:
        return [basis]

    def leading_components(self, rank: Rank) -> tuple[int, ...]:
        return tuple(range(rank))

    def check_components(self, info: LayerInfo, rank: Rank, components: Any) -> tuple[int, ...]:
        limit = self.max_rank(info)
        checked = _index_list(components, rank, limit)
        if checked is None:
            raise ValueError(f"plan components must be {rank} distinct indices in [0, {limit}), got {components}")
        return checked

    def plan_components(self, rank: Rank, components: Components | Fit) -> Components | None:
        leading = isinstance(components, Fit) or tuple(components) == self.leading_components(rank)
        return None if leading else components

    def reconstruct(self, basis: Spectrum, components: Components | Fit) -> torch.Tensor:
        if isinstance(components, Fit):
            components = self.leading_components(components.rank)
        return basis.reconstruct(components)

    def build(self, info: LayerInfo, rank: Rank, basis: Spectrum | None = None,
              bias: torch.Tensor | None = None, components: Components | None = None) -> Factorized:
        if info.is_conv:
            first = _conv(info, info.in_channels, info.groups * rank, info.kernel_size, bias=False)
            second = _conv(info, info.groups * rank, info.out_channels, None, bias=info.has_bias)
        else:
            options = {"dtype": info.dtype, "device": info.device}
            first = nn.Linear(info.in_channels, rank, bias=False, **options)
            second = nn.Linear(rank, info.out_channels, bias=info.has_bias, **options)
        if basis is not None:
            A, B = basis.factors(rank, components)  # (g, T/g, r), (g, r, S/g·k)
            _fill(first, B)
            _fill(second, A, bias)
        return Factorized([first, second], self.name, rank)


class WhitenedSVD(SVD, name="whitened-svd"):
    """Truncated SVD of the weight whitened by its calibration inputs (SVD-LLM): the truncation that loses
    the least output on those inputs. Same factor modules as svd; ``basis_from_inputs`` needs the inputs'
    Gram matrix (``rankcut.input_statistics``), so compressing with it needs calibration data."""

    needs_inputs = True

    def unsupported_reason(self, info: LayerInfo) -> str | None:
        if info.is_conv and info.spatial_dims == 3:
            return "3-D conv: whitened-svd gathers input patches of 1-D and 2-D convs only; use svd"
        return super().unsupported_reason(info)

    def basis(self, kernel: torch.Tensor, leading: int | None = None) -> Spectrum:
        raise ValueError("whitened-svd needs the layer's calibration inputs: use basis_from_inputs "
                         "(compress, make_plan and apply gather them from a task)")

    def basis_from_inputs(self, kernel: torch.Tensor, gram: torch.Tensor) -> Spectrum:
        return Spectrum.whitened(kernel.reshape(kernel.shape[0], kernel.shape[1], -1), gram)


class Tucker2(Decomposition, name="tucker2"):
    """Tucker-2 of a conv's channel modes (Kim et al. 2016): 1×1 conv → k×k core conv → 1×1 conv, per group.

    Without ``components`` the factors are fitted by HOOI. With ``components`` (one index tuple per mode:
    output, input) the kernel is projected on exactly those singular vectors of its unfoldings, with no HOOI
    refinement: the weights the loss-aware selectors measured.
    """

    supports_components = True

    def unsupported_reason(self, info: LayerInfo) -> str | None:
        if not info.is_conv:
            return "tucker2 factorizes convolutions only; use svd for linear layers"
        return _depthwise_reason(info)

    def max_rank(self, info: LayerInfo) -> tuple[int, int]:
        k = info.kernel_volume
        return min(info.out_per_group, info.in_per_group * k), min(info.in_per_group, info.out_per_group * k)

    def params(self, info: LayerInfo, rank: Rank) -> int:
        r_out, r_in = rank
        per_group = info.in_per_group * r_in + r_in * r_out * info.kernel_volume + r_out * info.out_per_group
        return info.groups * per_group + (info.out_channels if info.has_bias else 0)

    def macs(self, info: LayerInfo, rank: Rank) -> int:
        r_out, r_in = rank
        g = info.groups
        return (
            info.input_positions * g * r_in * info.in_per_group
            + info.output_positions * g * (r_out * r_in * info.kernel_volume + info.out_per_group * r_out)
        )

    def ranks_by_size(self, info: LayerInfo) -> list[tuple[int, int]]:
        """Rank pairs that keep the two channel modes in the layer's out:in proportion, growing."""
        max_out, max_in = self.max_rank(info)
        ratio = info.in_per_group / info.out_per_group
        pairs = {(r, min(max_in, max(1, round(r * ratio)))) for r in range(1, max_out + 1)}
        pairs.add((max_out, max_in))
        return sorted(pairs, key=lambda pair: (self.params(info, pair), pair))

    def basis(self, kernel: torch.Tensor, leading: int | None = None) -> TuckerBasis:
        if leading is not None:
            raise ValueError("tucker2 computes its unfoldings' spectra exactly; a partial basis is for svd only")
        return TuckerBasis.of(kernel)

    def basis_from_tensors(self, tensors: dict[str, torch.Tensor],
                           loader: Callable[[str], torch.Tensor] | None = None) -> TuckerBasis:
        return TuckerBasis.from_tensors(tensors, loader)

    def relative_error(self, basis: TuckerBasis, rank: Rank, components: Components | None = None) -> float:
        return self._factors(basis, rank, components).relative_error

    def spectra(self, basis: TuckerBasis) -> list[Spectrum]:
        return [basis.out_spectrum, basis.in_spectrum]

    def leading_components(self, rank: Rank) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(range(rank[0])), tuple(range(rank[1]))

    def check_components(self, info: LayerInfo, rank: Rank, components: Any) -> Components:
        limits = self.max_rank(info)
        modes = components if isinstance(components, (list, tuple)) and len(components) == 2 else (None, None)
        checked = tuple(_index_list(mode, r, limit) for mode, r, limit in zip(modes, rank, limits, strict=True))
        if None in checked:
            raise ValueError(f"plan components must be two lists (output, input) of {rank[0]} and {rank[1]} distinct "
                             f"indices in [0, {limits[0]}) and [0, {limits[1]}), got {components}")
        return checked

    def reconstruct(self, basis: TuckerBasis, components: Components | Fit) -> torch.Tensor:
        fit = isinstance(components, Fit)
        kernel = (basis.factorize(tuple(components.rank)) if fit else basis.truncate(*components)).kernel()
        return kernel.reshape(kernel.shape[0], kernel.shape[1], -1)

    @staticmethod
    def _factors(basis: TuckerBasis, rank: Rank, components: Components | None) -> Tucker2Factors:
        return basis.factorize(tuple(rank)) if components is None else basis.truncate(*components)

    def build(self, info: LayerInfo, rank: Rank, basis: TuckerBasis | None = None,
              bias: torch.Tensor | None = None, components: Components | None = None) -> Factorized:
        r_out, r_in = rank
        g = info.groups
        first = _conv(info, info.in_channels, g * r_in, None, bias=False)
        core = _conv(info, g * r_in, g * r_out, info.kernel_size, bias=False)
        last = _conv(info, g * r_out, info.out_channels, None, bias=info.has_bias)
        if basis is not None:
            factors = self._factors(basis, rank, components)
            _fill(first, factors.U_in.transpose(1, 2))  # (g, R_in, S/g)
            _fill(core, factors.core)  # (g, R_out, R_in, *k)
            _fill(last, factors.U_out, bias)  # (g, T/g, R_out)
        return Factorized([first, core, last], self.name, (r_out, r_in))
