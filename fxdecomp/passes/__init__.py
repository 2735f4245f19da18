"""The passes of the pipeline, one module each named as it is registered (for the recipes in ``passes/``), and the pass manager."""

from . import annotate_cost, calibrate, estimate_ranks, find_candidates, plan, rewrite, shape_prop, verify  # noqa: F401  (registration)
from . import correct_factors, fold_batchnorm, reestimate_batchnorm  # noqa: F401  (registration)
from . import compensate  # noqa: F401  (registration)
from .base import CallSite, Candidate, Pass, PassContext, known_passes, make_pass, pass_class, register_pass
from .manager import ManagerResult, PassManager, StepRecord, check_order

__all__ = [
    "CallSite",
    "Candidate",
    "ManagerResult",
    "Pass",
    "PassContext",
    "PassManager",
    "StepRecord",
    "check_order",
    "known_passes",
    "make_pass",
    "pass_class",
    "register_pass",
]
