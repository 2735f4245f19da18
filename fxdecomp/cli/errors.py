"""Exit codes and error lines of the command line.

0 success, 2 bad usage or bad input, 1 any other failure (130 on Ctrl-C). An error prints as
one line, ``fxdecomp: error: ...``, then ``fxdecomp: hint: ...``; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import math
import sys
import traceback

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad usage found after parsing: a missing file, a path clash, an unreadable input. Exit 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def classify(exc: BaseException) -> tuple[int, str | None]:
    """(exit code, hint) for an exception."""
    from ..errors import BudgetError, ExportError, InvalidInputError, RecipeError, TraceError, UnknownMethodError, UnsupportedLayerError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, exc.hint
    if isinstance(exc, BudgetError):
        reachable = getattr(exc, "smallest_reachable", None)
        hint = f"the smallest reachable budget is {reachable:.4g}; pass --budget {math.ceil(reachable * 1000) / 1000:g} or more" if reachable else None
        return EXIT_USAGE, hint
    if isinstance(exc, UnknownMethodError):
        return EXIT_USAGE, "pass --methods as a comma-separated list of the known methods, e.g. --methods svd,tucker2"
    if isinstance(exc, RecipeError):
        return EXIT_USAGE, "pass --recipe a recipe name from passes/ or a path to a .toml file"
    if isinstance(exc, TraceError):
        return EXIT_USAGE, "exclude the untraceable part with --exclude, or make the forward traceable; --verbose shows the traceback"
    if isinstance(exc, (InvalidInputError, UnsupportedLayerError)):
        return EXIT_USAGE, None
    if isinstance(exc, ExportError):
        return EXIT_FAILURE, "--verbose shows the exporter's traceback"
    return EXIT_FAILURE, "run again with --verbose for the traceback"


def print_error(message: str, hint: str | None, verbose: bool) -> None:
    """The error as one line on stderr (cut at 800 characters unless verbose), then the hint."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    line = " ".join(message.split())
    if len(line) > 800 and not verbose:
        line = line[:800] + " ... (--verbose prints all of it)"
    print(f"fxdecomp: error: {line}", file=sys.stderr)
    if hint:
        print(f"fxdecomp: hint: {hint}", file=sys.stderr)
