"""rankcut: low-rank factorization that makes trained PyTorch models smaller and faster, with ranks you can trust."""

from rankcut import hf
from rankcut.api import apply, build_skeleton, compress, make_plan, plan_of
from rankcut.bases import BasisStore
from rankcut.checkpoint import CheckpointError, load, read_plan, save
from rankcut.counting import count_macs, count_params
from rankcut.inventory import scan
from rankcut.joint import LossAware
from rankcut.latency import LatencyGuard
from rankcut.layers import DECOMPOSITIONS, Decomposition, Factorized
from rankcut.plan import LayerPlan, Plan
from rankcut.report import Report
from rankcut.selectors import Choice, RankPolicy, Selector, parse_selector
from rankcut.tasks import Task
from rankcut.tasks.loader import LoaderTask
from rankcut.training import OrthogonalRegularizer, collapse, overparameterize

__version__ = "0.1.0"

__all__ = [
    "DECOMPOSITIONS",
    "BasisStore",
    "CheckpointError",
    "Choice",
    "Decomposition",
    "Factorized",
    "LatencyGuard",
    "LayerPlan",
    "LoaderTask",
    "LossAware",
    "OrthogonalRegularizer",
    "Plan",
    "RankPolicy",
    "Report",
    "Selector",
    "Task",
    "__version__",
    "apply",
    "build_skeleton",
    "collapse",
    "compress",
    "count_macs",
    "count_params",
    "hf",
    "load",
    "make_plan",
    "overparameterize",
    "parse_selector",
    "plan_of",
    "read_plan",
    "save",
    "scan",
]
