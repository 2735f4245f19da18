"""The entry point: parse, run the command inside the console, turn exceptions into exit codes."""

from __future__ import annotations

from collections.abc import Sequence

from .console import console
from .errors import EXIT_INTERRUPTED, EXIT_OK, classify, print_error
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1, 2 or 130)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    verbose, quiet = args.verbose, args.quiet
    with console(verbose, quiet):
        try:
            return args.run(args) or EXIT_OK
        except KeyboardInterrupt:
            print_error("interrupted", None, verbose)
            return EXIT_INTERRUPTED
        except Exception as exc:  # one line per error; the traceback only when asked
            code, hint = classify(exc)
            print_error(str(exc) or type(exc).__name__, hint, verbose)
            return code
