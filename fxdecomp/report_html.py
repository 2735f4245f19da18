"""Moved to `fxdecomp.report.html` (reports live in `fxdecomp.report`); this module re-exports its name."""

from .report.html import render_html  # noqa: F401

__all__ = ["render_html"]
