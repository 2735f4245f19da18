"""The ``fxdecomp`` command line: compress, inspect, export, bench, apply, demo.

Exit codes: 0 success, 2 bad usage or bad input, 1 any other failure. Errors print as
one line (``fxdecomp: error: ...``) and a hint; ``--verbose`` adds the traceback.

Layout: `app` (main), `parser` (the parser, ``--version``), `errors` (exit codes, error
lines), `console` (warnings, log), `args` (shared flags), one module per command
(`compress` with apply, `inspect`, `export`, `bench`, `demo`), `loading` (model, inputs,
budget), `outputs` (path checks); reports and text tables live in `fxdecomp.report`.

Example::

    fxdecomp compress mypkg.models:resnet18 --input-shape 1,3,224,224 --budget 0.5 \\
        --out small.pt --onnx small.onnx --report report.html --plan plan.json
    fxdecomp apply plan.json mypkg.models:resnet18 --input-shape 1,3,224,224 --onnx small.onnx
    python -m fxdecomp demo
"""

from ..progress import Progress
from ..report.text import format_table, layers_table, summary_table
from .app import main
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from .loading import load_inputs, load_model, parse_budget, parse_shape
from .parser import build_parser

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "Progress",
    "UsageError",
    "build_parser",
    "format_table",
    "layers_table",
    "load_inputs",
    "load_model",
    "main",
    "parse_budget",
    "parse_shape",
    "summary_table",
]
