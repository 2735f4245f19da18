"""``fxdecomp export``: a model (a factory, a saved model, or a compressed .pt) to ONNX, checked in onnxruntime."""

from __future__ import annotations

import argparse

from ..progress import Progress
from .args import AddCommand, input_args, model_args, positive_int
from .errors import EXIT_OK
from .loading import load_model_and_inputs, use_torch
from .outputs import check_paths, input_paths


def register(command: AddCommand) -> None:
    sub = command(
        "export", "export a model (a factory, a saved model, or a compressed .pt) to ONNX, checked in onnxruntime",
        "fxdecomp export small.pt --input-shape 1,3,224,224 --out small.onnx",
        run,
    )  # fmt: skip
    model_args(sub)
    input_args(sub)
    sub.add_argument("--out", required=True, help="the .onnx file to write")
    sub.add_argument("--opset", type=positive_int, default=18, help="ONNX opset (default 18)")
    sub.add_argument("--static-batch", action="store_true", help="fix the batch dimension (default: dynamic)")


def run(args: argparse.Namespace) -> int:
    import fxdecomp

    check_paths({"--out": args.out}, input_paths(args))
    use_torch(args.threads)
    progress = Progress.on_terminal(args.quiet)
    model, inputs = load_model_and_inputs(args, progress)
    with progress.stage(f"exporting {args.out}"):
        report = fxdecomp.export_onnx(model, inputs, args.out, opset=args.opset, dynamic_batch=not args.static_batch)
    diff = f"max abs diff vs torch {report.max_abs_diff:.3g}" if report.max_abs_diff is not None else "parity not checked"
    print(f"wrote {report.path} (opset {report.opset}; inputs {', '.join(map(str, report.inputs))}; {diff})")
    return EXIT_OK
