"""Selector specs: the strings the API and CLI accept, e.g. ``"fixed:0.5"``, ``"evbmf"``, ``"budget:params=0.4"``."""

from __future__ import annotations

from collections.abc import Callable

from rankcut.selectors.base import Selector
from rankcut.selectors.budget import Budget
from rankcut.selectors.fixed import FixedFraction, FixedRank, FullRank
from rankcut.selectors.spectral import EVBMF, Energy


def _number(kind: str, text: str | None, convert: Callable[[str], float | int]) -> float | int:
    try:
        return convert(text or "")
    except ValueError:
        raise ValueError(f"{kind}: expected a number after ':', got {text!r}") from None


def _no_argument(kind: str, factory: Callable[[], Selector]) -> Callable[[str | None], Selector]:
    def make(arg: str | None) -> Selector:
        if arg:
            raise ValueError(f"{kind} takes no argument, got {arg!r}")
        return factory()
    return make


def _budget(arg: str | None) -> Selector:
    metric, _, value = (arg or "").rpartition("=")
    return Budget(_number("budget", value, float), metric or "params")


def _lossless(arg: str | None) -> Selector:
    from rankcut.joint import LossAware

    metric, _, value = (arg or "").rpartition("=")
    if not value:
        raise ValueError("lossless needs a size to keep, e.g. lossless:params=0.5 or lossless:macs=0.4")
    return LossAware("lossless", _number("lossless", value, float), metric or "params")


def _compact(arg: str | None) -> Selector:
    from rankcut.joint import LossAware

    if arg not in (None, "loss", "metric"):
        raise ValueError(f"compact takes 'loss' (default: validation loss and metric no worse) or 'metric' "
                         f"(validation metric no worse), e.g. compact:metric; got {arg!r}")
    return LossAware("compact", criterion=arg or "loss")


SELECTORS: dict[str, Callable[[str | None], Selector]] = {
    "full": _no_argument("full", FullRank),
    "fixed": lambda arg: FixedFraction(_number("fixed", arg, float)),
    "rank": lambda arg: FixedRank(_number("rank", arg, int)),
    "energy": lambda arg: Energy(_number("energy", arg, float)),
    "evbmf": lambda arg: EVBMF(_number("evbmf", arg, float) if arg else 1.0),
    "budget": _budget,
    "lossless": _lossless,
    "compact": _compact,
}

EXAMPLES = ("full, fixed:0.5, rank:32, energy:0.95, evbmf, evbmf:0.8, budget:params=0.4, budget:macs=0.5, "
            "lossless:params=0.5 (needs a task), compact, compact:metric (need a task)")


def parse_selector(select: str | Selector) -> Selector:
    """A selector from a spec string (``EXAMPLES``) or a ``Selector`` object, which is returned as is."""
    if isinstance(select, Selector):
        return select
    if not isinstance(select, str):
        raise TypeError(f"select must be a spec string ({EXAMPLES}) or a Selector, got {type(select).__name__}")
    kind, _, arg = select.partition(":")
    factory = SELECTORS.get(kind.strip().lower())
    if factory is None:
        raise ValueError(f"unknown selector {select!r}; available: {EXAMPLES}")
    return factory(arg.strip() or None)
