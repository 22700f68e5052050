"""Orthogonal regularization of over-parameterized factors, with an optional spectrum-sparsity term."""

from __future__ import annotations

import math

import torch
from torch import nn

from rankcut.training.overparam import factors_of, low_rank_products


def orthogonality_penalty(factor: torch.Tensor) -> torch.Tensor:
    """‖G − I‖²_F divided by G's entry count, with G = AᵀA (or AAᵀ when A is wide), summed over groups.

    ``factor`` is (groups, rows, width). A factor with more columns than rows cannot have orthonormal
    columns, so the Gram matrix of the smaller side is the one pushed towards the identity.
    """
    gram = factor.transpose(1, 2) @ factor if factor.shape[2] <= factor.shape[1] else factor @ factor.transpose(1, 2)
    side = gram.shape[-1]
    identity = torch.eye(side, dtype=factor.dtype, device=factor.device)
    return ((gram - identity) ** 2).sum() / side**2


def spread(strengths: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖s‖₁ / (√w‖s‖₂) per group, summed: 1 for a flat spectrum, 1/√w for a single component; scale-free."""
    width = strengths.shape[-1]
    return (strengths.abs().sum(-1) / (math.sqrt(width) * strengths.norm(dim=-1).clamp_min(eps))).sum()


class OrthogonalRegularizer:
    """λ·Σ_layers (P(U) + P(V)) + μ·Σ_layers spread(s), for the layers ``overparameterize`` made.

    P is ``orthogonality_penalty``: the mean squared entry of Gram − I, so layers of every width weigh alike.
    ``spread`` is scale-free on purpose: a plain L1 on s would only shrink weights that batch norm rescales.
    Use it in your own loop by adding ``regularizer()`` to the loss. U and V need no weight decay: the
    penalty fixes their scale (``factor_parameters`` lists them so an optimizer can exclude them).
    """

    def __init__(self, model: nn.Module, weight: float = 1e-3, sparsity: float = 0.0) -> None:
        if weight < 0 or sparsity < 0:
            raise ValueError(f"OrthogonalRegularizer: weight and sparsity must be ≥ 0, got {weight} and {sparsity}")
        self.layers = [module for _, module, _ in low_rank_products(model)]
        if not self.layers:
            raise ValueError("OrthogonalRegularizer: the model has no over-parameterized layer; "
                             "call rankcut.overparameterize(model) first")
        self.weight = weight
        self.sparsity = sparsity

    def terms(self) -> dict[str, torch.Tensor]:
        """The unweighted sums: ``orthogonality`` over U and V of every layer, ``spread`` over every s."""
        orthogonality, spreads = [], []
        for module in self.layers:
            U, s, V = factors_of(module)
            orthogonality += [orthogonality_penalty(U), orthogonality_penalty(V)]
            spreads.append(spread(s))
        return {"orthogonality": torch.stack(orthogonality).sum(), "spread": torch.stack(spreads).sum()}

    def __call__(self) -> torch.Tensor:
        terms = self.terms()
        return self.weight * terms["orthogonality"] + self.sparsity * terms["spread"]

    def factor_parameters(self) -> list[nn.Parameter]:
        """The U and V parameters of every over-parameterized layer."""
        return [p for module in self.layers for p in factors_of(module)[::2]]
