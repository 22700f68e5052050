"""Loss-aware joint rank selection (lossless / compact): statistics, per-layer curves, probes, the selector."""

from rankcut.joint.curves import LayerCurve, removal_order
from rankcut.joint.probing import LossProbe, substituted
from rankcut.joint.selector import LossAware
from rankcut.joint.statistics import ComponentStats, gather_statistics

__all__ = ["ComponentStats", "LayerCurve", "LossAware", "LossProbe", "gather_statistics", "removal_order",
           "substituted"]
