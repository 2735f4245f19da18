"""Progress on stderr: timed stages (``fxdecomp: exporting ... 1.2 s``), notes, and a counter line.

One class for the command line and for long passes (factorising layers, calibrating). Silent
unless enabled; `Progress.on_terminal` enables it when stderr is a terminal and the user did
not ask for quiet, and `compress` does the same for its passes.

Example::

    progress = Progress.on_terminal(quiet=False)
    with progress.stage("exporting small.onnx"):
        ...
    with Progress("planning layer", total=len(layers), enabled=True) as counter:
        for layer in layers:
            counter.step(layer)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, label: str = "", total: int | None = None, enabled: bool = False):
        self.label, self.total, self.enabled = label, total, enabled
        self.count, self.start = 0, time.perf_counter()

    @classmethod
    def on_terminal(cls, quiet: bool = False) -> "Progress":
        """Enabled only when stderr is a terminal and ``quiet`` is false (``--quiet``)."""
        return cls(enabled=not quiet and stderr_is_terminal())

    # ---- a counter on one line, rewritten in place ----

    def step(self, detail: str = "") -> None:
        """Count one item of ``total`` and show it with ``detail`` (and, past the first item, the time left)."""
        self.count += 1
        if self.enabled:
            of = f"/{self.total}" if self.total else ""
            eta = ""
            if self.total and self.count > 1:  # the items done so far set the pace of the rest
                left = (time.perf_counter() - self.start) / (self.count - 1) * (self.total - self.count + 1)
                eta = f" (about {left:.0f} s left)"
            line = f"fxdecomp: {self.label} {self.count}{of}{eta} {detail}"[:120]
            print(f"\r{line:<120}", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.count:
            print(f"\rfxdecomp: {self.label} done, {self.count} in {time.perf_counter() - self.start:.1f} s".ljust(121), file=sys.stderr)

    # ---- timed stages and notes, one line each ----

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[None]:
        """``fxdecomp: <what> ...`` then its seconds (or ``failed``) on the same line."""
        if not self.enabled:
            yield
            return
        print(f"fxdecomp: {what} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """An indented line under the last stage (e.g. one pass's time)."""
        if self.enabled:
            print(f"fxdecomp:   {text}", file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
