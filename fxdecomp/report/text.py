"""Text reports: the markdown report of a result, the command line's plain-text tables, number formats.

Example::

    print(markdown_report(result))                     # what CompressionResult.report() returns
    print(summary_table(result, latency))               # the table `fxdecomp compress` prints
    print(format_table(["", "before", "after"], [["FLOPs", "1.2G", "600M"]], numeric={1, 2}))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..onnxrt.session import LatencyComparison
    from ..result import CompressionResult, Decision


def markdown_report(result: CompressionResult, latency: LatencyComparison | None = None) -> str:
    """A markdown table, one row per candidate layer, and the totals; ``latency`` adds the measured medians."""
    lines = [
        f"Budget {result.budget}: FLOPs {num(result.flops_before)} -> {num(result.flops_after)} "
        f"({result.flops_ratio:.1%}), parameters {num(result.params_before)} -> {num(result.params_after)} "
        f"({result.params_ratio:.1%}); FLOPs = 2 x multiply-adds."
        + (f" Output relative error on the example inputs: {result.output_error:.3g}." if result.output_error is not None else "")
        + (
            f" onnxruntime latency {result.latency_before_ms:.3g} ms -> {result.latency_after_ms:.3g} ms."
            if result.latency_before_ms is not None and result.latency_after_ms is not None
            else ""
        ),
        *(
            [f"Captured in parts (the whole model could not be): {', '.join(f'{c.name} ({c.frontend}, {c.fraction:.1%} of the FLOPs)' for c in result.captured)}."]
            if result.partial
            else []
        ),
        *(
            [f"Kept because no frontend sees into their calls: {', '.join(f'{w.parameter} ({w.consumer})' for w in result.opaque_weights)}."]
            if result.opaque_weights
            else []
        ),
        "",
        "| layer | op | method | ranks | FLOPs before | FLOPs after | params before | params after | predicted error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for d in result.decisions:
        ranks = ", ".join(map(str, d.ranks)) if d.ranks else "-"
        lines.append(
            f"| {d.name} | {d.op} | {method_text(d)} | {ranks} | {num(d.flops_before)} | {num(d.flops_after)} | "
            f"{num(d.params_before)} | {num(d.params_after)} | {d.error:.3g} |"
        )
    lines += [f"Note on {d.name}: {d.note}." for d in result.decisions if d.note]
    text = "\n".join(lines)
    if latency is not None:
        text += (
            f"\n\nMedian onnxruntime latency: {latency.a.median_ms:.3f} ms -> {latency.b.median_ms:.3f} ms "
            f"({latency.a.threads} thread(s), {latency.a.runs} interleaved runs)."
        )
    return text


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset()) -> str:
    """A plain-text table; columns in ``numeric`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def layers_table(result: CompressionResult) -> str:
    """The command line's per-layer table: method, ranks, FLOPs before and after, predicted error."""
    rows = []
    for d in result.decisions:
        rows.append([d.name, method_text(d), ranks_text(d.ranks), num(d.flops_before), num(d.flops_after), f"{d.error:.3g}" if d.decomposed else "-"])
    return format_table(["layer", "method", "ranks", "FLOPs before", "FLOPs after", "pred. error"], rows, numeric={3, 4, 5})


def summary_table(result: CompressionResult, latency: LatencyComparison | None = None) -> str:
    """`layers_table` and the totals, as ``fxdecomp compress`` prints them."""
    lines = [
        layers_table(result),
        "",
        f"FLOPs {num(result.flops_before)} -> {num(result.flops_after)} ({result.flops_ratio:.1%}), "
        f"parameters {num(result.params_before)} -> {num(result.params_after)} ({result.params_ratio:.1%}); "
        "FLOPs = 2 x multiply-adds."
        + (f" Output relative error on the example inputs: {result.output_error:.3g}." if result.output_error is not None else ""),
    ]
    if latency is not None:
        lines.append(
            f"Median onnxruntime latency {latency.a.median_ms:.3f} ms -> {latency.b.median_ms:.3f} ms "
            f"({speed_text(latency.a.median_ms / latency.b.median_ms)}, {latency.a.threads} thread(s))."
        )
    return "\n".join(lines)


def num(value: int) -> str:
    """A count with a G / M / k suffix and two decimals (``1234567`` -> ``"1.23M"``)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def method_text(decision: Decision) -> str:
    """The method, or ``keep (reason)`` for a layer kept for a stated reason."""
    return decision.method if decision.decomposed or not decision.reason else f"keep ({decision.reason})"


def ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks)) if ranks else "-"


def speed_text(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def spread_text(stats) -> str:
    return f"{stats.p10_ms:.3f}-{stats.p90_ms:.3f}"


def budget_text(budget: dict) -> str:
    names = {"flops": "FLOPs", "params": "parameters"}
    return ", ".join(f"{v:g} of its {names.get(k, k)}" for k, v in budget.items())
