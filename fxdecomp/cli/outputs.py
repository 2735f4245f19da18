"""The files a command writes: checked before any work, written atomically (reports: `fxdecomp.report`).

Example::

    outputs = requested_outputs(args)            # {"--onnx": "small.onnx", ...}
    check_paths(outputs, input_paths(args))      # no output over an input, no two on one path
    atomic_write_text(outputs["--report"], render_report(result, outputs["--report"]))   # fxdecomp.report
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..report import report_format
from .errors import UsageError


def requested_outputs(args: argparse.Namespace) -> dict[str, str]:
    outputs = {flag: getattr(args, flag[2:]) for flag in ("--out", "--onnx", "--report", "--plan") if getattr(args, flag[2:], None)}
    report = outputs.get("--report")
    if report and report_format(report) is None:
        raise UsageError(f"--report {report!r}: unknown format", "end the file name in .md, .json or .html")
    return outputs


def input_paths(args: argparse.Namespace) -> list[str]:
    candidates = [getattr(args, name, None) for name in ("model", "weights", "inputs", "calibration", "recipe", "plan_file")]
    return [p for p in candidates if p and os.path.exists(p)]


def check_paths(outputs: dict[str, str], inputs: Sequence[str]) -> None:
    """Refuse an output that is an input, two outputs on one path, or a path in a missing directory."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        real = os.path.realpath(path)
        for source in inputs:
            if real == os.path.realpath(source) or (os.path.exists(path) and os.path.samefile(path, source)):
                raise UsageError(f"{flag} {path!r} is an input of this command; refusing to overwrite it", "write the output elsewhere")
        if real in seen:
            raise UsageError(f"{flag} and {seen[real]} both write {path!r}", "give each output its own file")
        seen[real] = flag
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a directory", "give a file path")
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path!r}: directory {parent!r} does not exist", "create it first")
