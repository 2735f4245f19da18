"""A one-line progress display on stderr for long work (factorising layers, calibrating).

Silent unless enabled; `compress` enables it when stderr is a terminal.

Example::

    with Progress("planning layer", total=len(layers), enabled=True) as progress:
        for layer in layers:
            progress.step(layer)
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None = None, enabled: bool = False):
        self.label, self.total, self.enabled = label, total, enabled
        self.count, self.start = 0, time.perf_counter()

    def step(self, detail: str = "") -> None:
        self.count += 1
        if self.enabled:
            of = f"/{self.total}" if self.total else ""
            line = f"fxdecomp: {self.label} {self.count}{of} {detail}"[:100]
            print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.count:
            print(f"\rfxdecomp: {self.label} done, {self.count} in {time.perf_counter() - self.start:.1f} s".ljust(101), file=sys.stderr)


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
