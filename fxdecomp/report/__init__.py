"""Reports of a compression result, in one place: markdown and plain text, JSON, self-contained HTML.

`text` (the markdown report, the command line's tables, number formats), `json` (strict JSON
data), `html` (one HTML file with embedded plots). `render_report` picks the format from a
file name's extension, as ``fxdecomp compress --report`` does.

Example::

    from fxdecomp.report import render_report
    Path("report.html").write_text(render_report(result, "report.html", latency))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .html import render_html
from .json import json_report, result_dict
from .text import format_table, layers_table, markdown_report, summary_table

if TYPE_CHECKING:
    from ..onnxrt.session import LatencyComparison
    from ..result import CompressionResult

__all__ = [
    "REPORT_FORMATS",
    "format_table",
    "json_report",
    "layers_table",
    "markdown_report",
    "render_html",
    "render_report",
    "report_format",
    "result_dict",
    "summary_table",
]

REPORT_FORMATS = {".md": "md", ".markdown": "md", ".json": "json", ".html": "html", ".htm": "html"}


def report_format(path: str | os.PathLike) -> str | None:
    """``"md"``, ``"json"`` or ``"html"`` from ``path``'s extension (any case); None for another extension."""
    return REPORT_FORMATS.get(Path(path).suffix.lower())


def render_report(result: CompressionResult, path: str | os.PathLike, latency: LatencyComparison | None = None) -> str:
    """The report in the format that ``path``'s extension names (.md, .json, .html; markdown otherwise)."""
    kind = report_format(path) or "md"
    if kind == "html":
        return render_html(result, latency)
    if kind == "json":
        return json_report(result, latency)
    return markdown_report(result, latency) + "\n"
