"""Moved to `fxdecomp.planning.solver`; this name stays for old imports."""

from .planning.solver import Infeasible, Option, solve_mckp  # noqa: F401

__all__ = ["Infeasible", "Option", "solve_mckp"]
