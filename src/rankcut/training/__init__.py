"""Compressible training: over-parameterize, regularize towards orthogonal factors, collapse, compress."""

from rankcut.training.overparam import LowRankProduct, collapse, low_rank_products, overparameterize
from rankcut.training.regularizer import OrthogonalRegularizer, orthogonality_penalty, spread

__all__ = ["LowRankProduct", "OrthogonalRegularizer", "collapse", "low_rank_products", "orthogonality_penalty",
           "overparameterize", "spread"]
