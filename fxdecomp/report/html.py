"""A compression result as ONE self-contained HTML file: summary, plots (embedded PNG), decisions table.

The plots: FLOPs per layer before and after, the chosen ranks, the predicted error
of each decomposed layer, and the measured onnxruntime latency when given. Nothing
is loaded from outside the file (no scripts, fonts or stylesheets).

Example::

    from fxdecomp.report import render_html
    result = fxdecomp.compress(model, (x,), budget=0.5)
    Path("report.html").write_text(render_html(result))
    # with latency: render_html(result, compare_latency("orig.onnx", "small.onnx", (x,)))
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .text import method_text
from .text import num as _num

if TYPE_CHECKING:
    from ..onnxrt.session import LatencyComparison
    from ..result import CompressionResult, Decision

__all__ = ["render_html"]

_BEFORE, _AFTER = "#8c8c8c", "#2a7ab9"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.kept td { color: #777; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
.summary td:first-child { font-weight: 600; }
"""


def render_html(result: CompressionResult, latency: LatencyComparison | None = None) -> str:
    """The report as an HTML document (a str); ``latency`` compares original (a) and compressed (b)."""
    decomposed = [d for d in result.decisions if d.decomposed]
    figures = [("FLOPs per layer, before and after (FLOPs = 2 x multiply-adds)", _flops_plot(result.decisions))]
    if decomposed:
        figures.append(("Chosen ranks of each decomposed layer (input side first)", _ranks_plot(decomposed)))
        figures.append(("Predicted relative output error of each decomposed layer", _error_plot(decomposed)))
    if latency is not None:
        figures.append(("Median onnxruntime latency (bars: 10th to 90th percentile)", _latency_plot(latency)))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>fxdecomp report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>fxdecomp compression report</h1>",
        _summary(result, latency),
        *(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, png in figures
        ),
        "<h2>Decisions</h2>",
        _decisions_table(result.decisions),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary(result: CompressionResult, latency: LatencyComparison | None) -> str:
    rows = [
        ("FLOPs (2 x multiply-adds)", f"{_num(result.flops_before)} &rarr; {_num(result.flops_after)} ({result.flops_ratio:.1%})"),
        ("parameters", f"{_num(result.params_before)} &rarr; {_num(result.params_after)} ({result.params_ratio:.1%})"),
        ("budget", html.escape(", ".join(f"{k} {v:g}" for k, v in result.budget.items()) or "-")),
        ("layers decomposed", f"{sum(d.decomposed for d in result.decisions)} of {len(result.decisions)}"),
        ("pipeline / frontend", html.escape(f"{result.pipeline} / {result.frontend}")),
    ]
    if result.output_error is not None:
        rows.append(("output relative error (example inputs)", f"{result.output_error:.3g}"))
    if latency is not None:
        rows.append(
            (
                "median latency (onnxruntime)",
                f"{latency.a.median_ms:.3f} ms &rarr; {latency.b.median_ms:.3f} ms "
                f"(speed-up {latency.a.median_ms / latency.b.median_ms:.2f}x, {latency.a.threads} thread(s))",
            )
        )
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _decisions_table(decisions: Sequence[Decision]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("layer", "op", "method", "ranks", "FLOPs before", "FLOPs after", "params before", "params after", "predicted error")
    )
    rows = []
    for d in decisions:
        cells = [
            f"<td>{html.escape(d.name)}</td>",
            f"<td>{html.escape(d.op)}</td>",
            f"<td>{html.escape(method_text(d))}</td>",
            f"<td>{html.escape(', '.join(map(str, d.ranks)) or '-')}</td>",
            *(f'<td class="n">{_num(v)}</td>' for v in (d.flops_before, d.flops_after, d.params_before, d.params_after)),
            f'<td class="n">{d.error:.3g}</td>',
        ]
        rows.append(f'<tr class="{"decomposed" if d.decomposed else "kept"}">{"".join(cells)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# ---- plots (matplotlib's object API: no pyplot state, no display needed) -------------------


def _figure(rows: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(9, max(2.2, 0.32 * rows + 1.0)), dpi=100, layout="constrained")


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _flops_plot(decisions: Sequence[Decision]) -> str:
    figure = _figure(len(decisions))
    ax = figure.add_subplot()
    y = list(range(len(decisions)))
    ax.barh([i - 0.2 for i in y], [d.flops_before for d in decisions], height=0.4, color=_BEFORE, label="before")
    ax.barh([i + 0.2 for i in y], [d.flops_after for d in decisions], height=0.4, color=_AFTER, label="after")
    ax.set_yticks(y, [d.name for d in decisions])
    ax.invert_yaxis()
    ax.set_xlabel("FLOPs")
    ax.xaxis.set_major_formatter(lambda value, _: _num(int(value)))
    ax.legend(loc="lower right")
    return _png(figure)


def _ranks_plot(decisions: Sequence[Decision]) -> str:
    figure = _figure(len(decisions))
    ax = figure.add_subplot()
    bonds = max(len(d.ranks) for d in decisions)
    height = 0.8 / bonds
    for k in range(bonds):
        rows = [(i, d.ranks[k]) for i, d in enumerate(decisions) if k < len(d.ranks)]
        ax.barh([i - 0.4 + height * (k + 0.5) for i, _ in rows], [r for _, r in rows], height=height, label=f"rank {k + 1}")
    ax.set_yticks(range(len(decisions)), [f"{d.name} ({d.method})" for d in decisions])
    ax.invert_yaxis()
    ax.set_xlabel("rank")
    if bonds > 1:
        ax.legend(loc="lower right")
    return _png(figure)


def _error_plot(decisions: Sequence[Decision]) -> str:
    figure = _figure(len(decisions))
    ax = figure.add_subplot()
    ax.barh(range(len(decisions)), [d.error for d in decisions], color=_AFTER)
    ax.set_yticks(range(len(decisions)), [d.name for d in decisions])
    ax.invert_yaxis()
    ax.set_xlabel("predicted relative error")
    return _png(figure)


def _latency_plot(latency: LatencyComparison) -> str:
    figure = _figure(2)
    ax = figure.add_subplot()
    stats = (latency.a, latency.b)
    medians = [s.median_ms for s in stats]
    spread = [[s.median_ms - s.p10_ms for s in stats], [s.p90_ms - s.median_ms for s in stats]]
    ax.barh([0, 1], medians, xerr=spread, color=[_BEFORE, _AFTER], capsize=4)
    ax.set_yticks([0, 1], ["original", "compressed"])
    ax.invert_yaxis()
    ax.set_xlabel(f"milliseconds per run ({latency.a.threads} thread(s))")
    return _png(figure)
