"""Decomposers, registered per (layer kind, method) when this package is imported."""

from . import cp, spatial_svd, svd, tiled_svd, tt, tt_linear, tucker2  # noqa: F401  (registration)
from .base import Decomposer, all_methods, get_decomposer, methods_for, register

__all__ = ["Decomposer", "all_methods", "get_decomposer", "methods_for", "register"]
