"""Rank selectors: each turns a model's factorizable layers into per-layer ranks, with the reason for each."""

from rankcut.selectors.base import Choice, PerLayerSelector, RankPolicy, Selector
from rankcut.selectors.budget import Budget
from rankcut.selectors.fixed import FixedFraction, FixedRank, FullRank
from rankcut.selectors.registry import EXAMPLES, SELECTORS, parse_selector
from rankcut.selectors.spectral import EVBMF, Energy, energy_rank

__all__ = [
    "EVBMF", "EXAMPLES", "SELECTORS", "Budget", "Choice", "Energy", "FixedFraction", "FixedRank", "FullRank",
    "PerLayerSelector", "RankPolicy", "Selector", "energy_rank", "parse_selector",
]
