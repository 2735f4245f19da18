"""What the command line shows besides results: fxdecomp's warnings as one line each, and its log.

Example::

    with console(verbose=False, quiet=False):
        run_the_command()
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from ..errors import FxDecompWarning


@contextlib.contextmanager
def console(verbose: bool, quiet: bool) -> Iterator[None]:
    """Warnings as one line each (fxdecomp's own only, unless ``verbose``); log records with ``verbose``.

    ``quiet`` hides every warning. Restores the warning filters and the log handlers on exit.
    """

    def show(message, category, filename, lineno, file=None, line=None):
        if quiet or not (verbose or issubclass(category, FxDecompWarning)):
            return
        text = " ".join(str(message).split()).removeprefix("fxdecomp: ")
        print(f"fxdecomp: warning: {text}", file=sys.stderr)

    handler = None
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fxdecomp: %(name)s: %(message)s"))
        logging.getLogger("fxdecomp").addHandler(handler)
        logging.getLogger("fxdecomp").setLevel(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("always" if verbose else "default")
        warnings.showwarning = show
        try:
            yield
        finally:
            if handler is not None:
                logging.getLogger("fxdecomp").removeHandler(handler)
