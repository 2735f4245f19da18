"""fxdecomp.report: one home for the markdown, JSON and HTML reports; the old import path still works.

The result is built by hand (no compression), so every figure the reports print is known here.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import fx, nn

import fxdecomp.report_html
from fxdecomp.onnxrt.session import LatencyComparison, LatencyStats
from fxdecomp.report import REPORT_FORMATS, render_html, render_report, report_format
from fxdecomp.result import CompressionResult, Decision


def _result(output_error=0.0125):
    decisions = [
        Decision("features.0", "conv2d", "tucker2", (4, 8), 2_000_000, 900_000, 1_792, 700, 0.031),
        Decision("classifier.1", "linear", "keep", (), 1_500, 1_500, 760, 760, 0.0, reason="budget", note="kept whole"),
    ]
    return CompressionResult(
        fx.symbolic_trace(nn.Identity()), decisions, 2_001_500, 901_500, 2_552, 1_460, {"flops": 0.5}, output_error=output_error
    )


def _latency():
    a = LatencyStats(2.0, 1.8, 2.5, 2.1, 1.7, 30, 1)
    b = LatencyStats(1.0, 0.9, 1.3, 1.05, 0.85, 30, 1)
    return LatencyComparison(a, b, 0.5)


def test_old_html_path_is_the_same_function():
    assert fxdecomp.report_html.render_html is render_html


@pytest.mark.parametrize(("name", "kind"), [("r.md", "md"), ("r.MARKDOWN", "md"), ("r.json", "json"), ("r.Html", "html"), ("r.htm", "html"), ("r.txt", None)])
def test_format_follows_the_extension_in_any_case(name, kind):
    assert report_format(name) == kind
    assert set(REPORT_FORMATS.values()) == {"md", "json", "html"}


def test_markdown_report_rows_totals_and_latency():
    result = _result()
    text = result.report()
    assert "FLOPs 2.00M -> 901.50k (45.0%)" in text and "parameters 2.55k -> 1.46k (57.2%)" in text
    assert "| features.0 | conv2d | tucker2 | 4, 8 | 2.00M | 900.00k | 1.79k | 700 | 0.031 |" in text
    assert "| classifier.1 | linear | keep (budget) | - |" in text and "Note on classifier.1: kept whole." in text
    assert render_report(result, "r.md") == text + "\n"
    with_latency = render_report(result, "r.md", _latency())
    assert with_latency.startswith(text) and "2.000 ms -> 1.000 ms (1 thread(s), 30 interleaved runs)" in with_latency


def test_json_report_is_strict_and_carries_the_latency():
    result = _result(output_error=float("nan"))
    data = json.loads(render_report(result, "r.json", _latency()))
    assert data["output_error"] is None and result.to_dict()["output_error"] is None
    assert data["flops_ratio"] == pytest.approx(901_500 / 2_001_500)
    assert [d["ranks"] for d in data["decisions"]] == [[4, 8], []]
    assert data["latency"]["ratio"] == 0.5 and data["latency"]["compressed"]["median_ms"] == 1.0
    assert {k: v for k, v in data.items() if k != "latency"} == result.to_dict()


def test_html_report_by_extension_names_every_layer():
    text = render_report(_result(), "r.html", _latency())
    assert text.startswith("<!DOCTYPE html>") and text == render_html(_result(), _latency())
    assert "features.0" in text and "keep (budget)" in text and "speed-up 2.00x" in text
