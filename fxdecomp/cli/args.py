"""Building blocks of the parser shared by the commands: one subcommand, model, input and output flags.

Example (a command module's ``register``)::

    def register(command: AddCommand) -> None:
        sub = command("export", "export a model to ONNX", "fxdecomp export m.pt --input-shape 1,3,8,8 --out m.onnx", run)
        model_args(sub)
        input_args(sub)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, Protocol

from .errors import EXIT_USAGE

MODEL_HELP = (
    "the model: 'package.module:factory' (a function or class called with no arguments, importable from the "
    "current directory), or a file saved with torch.save(model) of a whole nn.Module. Such a file is loaded "
    "with torch.load(weights_only=False), which runs code stored in it: load only files you trust"
)

Run = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    def __call__(self, name: str, help: str, example: str, run: Run, note: str = "") -> argparse.ArgumentParser: ...


class Parser(argparse.ArgumentParser):
    """argparse with errors in the one-line format, a hint pointing at --help, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"fxdecomp: error: {message}", file=sys.stderr)
        print(f"fxdecomp: hint: see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def add_command(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser,
    name: str, help: str, example: str, run: Run, note: str = "",
) -> argparse.ArgumentParser:  # fmt: skip
    """A subcommand with the common flags, ``help`` as its description and ``example`` in its --help."""
    sub = commands.add_parser(
        name, help=help, description=help, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"{note}example:\n  {example}",
    )  # fmt: skip
    sub.set_defaults(run=run)
    return sub


def model_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    sub.add_argument("--weights", metavar="FILE", help="a state_dict (torch.save'd) to load into the factory's model")


def input_args(sub: argparse.ArgumentParser, required: bool = True) -> None:
    group = sub.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--input-shape", action="append", metavar="N,C,H,W",
        help="shape of one float32 input, filled with seeded random values (repeat for several inputs)"
        + ("" if required else "; default: the model's declared inputs with batch 1"),
    )  # fmt: skip
    group.add_argument("--inputs", metavar="FILE", help="example inputs: a tensor or a tuple of tensors saved with torch.save")


def output_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--out", metavar="FILE.pt", help="the compressed GraphModule, torch.save'd whole")
    sub.add_argument("--onnx", metavar="FILE.onnx", help="the compressed model exported to ONNX (checked in onnxruntime)")
    sub.add_argument("--report", metavar="FILE", help="the report: .md, .json or .html (by extension)")
    sub.add_argument("--plan", metavar="FILE.json", help="the decisions as JSON, for 'fxdecomp apply'")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def provider_args(sub: argparse.ArgumentParser) -> None:
    """``--provider`` and ``--provider-option KEY=VALUE``: the onnxruntime execution provider of timings."""
    sub.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider (default CPUExecutionProvider)")
    sub.add_argument(
        "--provider-option", action="append", default=[], metavar="KEY=VALUE", help="an option of the provider (repeatable)"
    )


def provider_options(args: argparse.Namespace) -> dict[str, str]:
    """The ``--provider-option`` flags as a dict; raises `UsageError` for one that is not KEY=VALUE."""
    from .errors import UsageError

    options = {}
    for text in args.provider_option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --provider-option {text!r}", "give KEY=VALUE, e.g. --provider-option device_id=0")
        options[key] = value
    return options
