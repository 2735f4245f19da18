"""The argument parser: the common flags, ``--version``, and one subcommand per command module.

A command module has ``register(command)``, which adds its subcommand with its flags and its
``run(args) -> exit code``; adding a flag to a command touches only that command's module.
"""

from __future__ import annotations

import argparse
import functools
import platform

from . import bench, compress, compress_llm, demo, export, inspect, latency_pack
from .args import Parser, add_command, positive_int

COMMAND_MODULES = (compress, inspect, export, bench, latency_pack, compress_llm, demo)  # apply is registered by compress, after it
DESCRIPTION = (
    "Make trained PyTorch models cheaper by low-rank decomposition (a torch.fx compiler pass). "
    "FLOPs count one multiply-add as 2 FLOPs."
)
EPILOG = "example:\n  fxdecomp demo\n  fxdecomp compress mypkg.models:resnet18 --input-shape 1,3,224,224 --budget 0.5 --onnx small.onnx"


def version_text() -> str:
    """``fxdecomp 0.1.0 (torch 2.13.0+cpu, Python 3.11.7)``: the installed distribution's version (importlib.metadata)."""
    import torch

    from .. import __version__

    return f"fxdecomp {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on error, and fxdecomp's log")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines and no warnings (results still print)")
    common.add_argument(
        "--threads", type=positive_int, default=1, metavar="N",
        help="CPU threads for torch and onnxruntime (default 1: steady timings, and MKL's SVD can stall with more)",
    )  # fmt: skip

    parser = Parser(prog="fxdecomp", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    command = functools.partial(add_command, commands, common)
    for module in COMMAND_MODULES:
        module.register(command)
    return parser
