"""The plan: per layer, the decomposition, the rank and the reason. Every selector makes one; every tool reads one."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from rankcut.layers import Rank

PLAN_FORMAT = "rankcut.plan/1"


@dataclass
class LayerPlan:
    """One layer's entry: what it is, what happens to it (``rank`` None: stays dense) and why.

    ``components`` lists the kept singular triplets (0 = largest) when a selector kept a subset other than
    the leading ``rank`` ones; None means the leading ones. For tucker2 it holds two lists (output and
    input channel components) and means "project on exactly these, no HOOI refinement".
    ``supported`` is False for layers no rank could be given (depthwise, ignored, tied...): they are not
    counted as factorizable.
    """

    name: str  # module path in the model
    kind: str
    weight_shape: list[int]
    groups: int
    decomposition: str
    rank: Rank | None
    max_rank: Rank
    reason: str
    params_before: int
    params_after: int
    supported: bool = True
    macs_before: int = 0
    macs_after: int = 0
    relative_error: float | None = None
    components: list[int] | list[list[int]] | None = None  # kept components when not the default fit

    @property
    def factorized(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("rank", "max_rank"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        """An entry read from JSON, each field checked for its type (a hand-edited or hostile plan.json)."""
        if not isinstance(data, dict):
            raise ValueError(f"plan entries must be objects, got {type(data).__name__}")
        data = dict(data)
        name = data.get("name")
        for key in ("rank", "max_rank"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"plan entry {name!r} has unknown fields {sorted(unknown)}")
        required = [key for key, spec in cls.__dataclass_fields__.items()
                    if spec.default is MISSING and spec.default_factory is MISSING]
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"plan entry {name!r} lacks the fields {missing}")
        for key, value in data.items():
            check, kind = _FIELD_RULES[key]
            if not check(value):
                raise ValueError(f"plan entry {name!r}: field {key!r} must be {kind}, got {value!r}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rank(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, tuple) and bool(value) and all(map(_is_int, value)))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


# each plan entry field: the check its JSON value must pass, and what that is in words
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_str, "a string"), "kind": (_is_str, "a string"), "decomposition": (_is_str, "a string"),
    "reason": (_is_str, "a string"),
    "weight_shape": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers"),
    "groups": (_is_int, "an integer"),
    "rank": (lambda v: v is None or _is_rank(v), "null, an integer or a list of integers"),
    "max_rank": (_is_rank, "an integer or a list of integers"),
    "params_before": (_is_int, "an integer"), "params_after": (_is_int, "an integer"),
    "supported": (lambda v: isinstance(v, bool), "true or false"),
    "macs_before": (_is_int, "an integer"), "macs_after": (_is_int, "an integer"),
    "relative_error": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                       "null or a number"),
    "components": (lambda v: v is None or isinstance(v, list), "null or a list"),
}


@dataclass
class Plan:
    """Per-layer choices for a whole model, with the selector that made them and where the model came from."""

    layers: list[LayerPlan]
    selector: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def factorized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.factorized]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "selector": self.selector, "meta": self.meta,
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a rankcut plan (format {found!r}, expected {PLAN_FORMAT!r})")
        layers, selector, meta = data.get("layers"), data.get("selector"), data.get("meta", {})
        if not isinstance(layers, list) or not isinstance(selector, str) or not isinstance(meta, dict):
            raise ValueError("a plan needs 'layers' (a list), 'selector' (a string) and, if any, 'meta' (an object); "
                             f"got {type(layers).__name__}, {type(selector).__name__} and {type(meta).__name__}")
        entries = [LayerPlan.from_dict(entry) for entry in layers]
        names = [entry.name for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"plan lists layers {repeated} more than once")
        return cls(entries, selector, meta)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"plan is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def table(self) -> str:
        """The plan as a fixed-width table, one row per layer."""
        rows = [("layer", "kind", "decomposition", "rank / max", "params kept", "rel. error", "reason")]
        for layer in self.layers:
            rank = f"{_rank_text(layer.rank)} / {_rank_text(layer.max_rank)}" if layer.factorized else "dense"
            kept = f"{layer.params_after / layer.params_before:.1%}" if layer.params_before else "-"
            error = f"{layer.relative_error:.3f}" if layer.relative_error is not None else "-"
            rows.append((layer.name, layer.kind, layer.decomposition if layer.factorized else "-", rank, kept, error,
                         layer.reason))
        return format_table(rows)


def _rank_text(rank: Rank | None) -> str:
    if rank is None:
        return "-"
    return "x".join(str(r) for r in rank) if isinstance(rank, tuple) else str(rank)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
