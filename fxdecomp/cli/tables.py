"""Plain-text tables of the command line: per-layer decisions, the summary, and number formats.

Example::

    print(format_table(["", "before", "after"], [["FLOPs", "1.2G", "600M"]], numeric={1, 2}))
"""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset()) -> str:
    """A plain-text table; columns in ``numeric`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def layers_table(result) -> str:
    rows = []
    for d in result.decisions:
        method = d.method if d.decomposed or not d.reason else f"keep ({d.reason})"
        rows.append([d.name, method, ranks_text(d.ranks), num(d.flops_before), num(d.flops_after), f"{d.error:.3g}" if d.decomposed else "-"])
    return format_table(["layer", "method", "ranks", "FLOPs before", "FLOPs after", "pred. error"], rows, numeric={3, 4, 5})


def summary_table(result, latency=None) -> str:
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
    from ..result import _num as short

    return short(value)


def ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks)) if ranks else "-"


def speed_text(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def spread_text(stats) -> str:
    return f"{stats.p10_ms:.3f}-{stats.p90_ms:.3f}"


def budget_text(budget: dict) -> str:
    names = {"flops": "FLOPs", "params": "parameters"}
    return ", ".join(f"{v:g} of its {names.get(k, k)}" for k, v in budget.items())

