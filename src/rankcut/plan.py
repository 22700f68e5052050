"""The plan: per layer, the decomposition, the rank and the reason. Every selector makes one; every tool reads one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
        data = dict(data)
        for key in ("rank", "max_rank"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"plan entry {data.get('name')!r} has unknown fields {sorted(unknown)}")
        return cls(**data)


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
        return cls([LayerPlan.from_dict(entry) for entry in data["layers"]], data["selector"], data.get("meta", {}))

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
