"""The passes of the pipeline, registered by name for the recipes in ``passes/``."""

from . import analysis, calibrate, plan, rewrite, verify  # noqa: F401  (registration)
from .base import CallSite, Candidate, Pass, PassContext, known_passes, make_pass, register_pass

__all__ = ["CallSite", "Candidate", "Pass", "PassContext", "known_passes", "make_pass", "register_pass"]
