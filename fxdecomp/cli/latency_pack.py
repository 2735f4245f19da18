"""``fxdecomp latency-pack``: the ONNX file of every structure the planner may pick, to time on the target device."""

from __future__ import annotations

import argparse

from ..progress import Progress
from .args import AddCommand, input_args, model_args
from .errors import EXIT_OK
from .loading import load_model_and_inputs, split_list, use_torch


def register(command: AddCommand) -> None:
    sub = command(
        "latency-pack", "write the ONNX file of every structure the planner may pick, to time on the target device",
        "fxdecomp latency-pack mypkg.models:resnet18 --input-shape 1,3,224,224 --out pack/\n"
        "  # on the device (onnxruntime + numpy only):  python pack/device_bench.py pack/ --out table.json\n"
        "  # then plan from it: a recipe whose plan options hold latency_table = \"table.json\"",
        run,
    )  # fmt: skip
    model_args(sub)
    input_args(sub)
    sub.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    sub.add_argument("--methods", help="comma-separated methods, as you will give compress (default: the recipe's)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob left alone (repeatable)")
    sub.add_argument("--recipe", help="pass pipeline whose plan options (grid, round_to) the pack follows (default: default)")


def run(args: argparse.Namespace) -> int:
    from ..latency_pack import latency_pack

    use_torch(args.threads)
    progress = Progress.on_terminal(args.quiet)
    model, inputs = load_model_and_inputs(args, progress)
    with progress.stage(f"writing the latency pack {args.out}"):
        pack = latency_pack(model, inputs, args.out, methods=split_list(args.methods), exclude=args.exclude, pipeline=args.recipe)
    print(
        f"wrote {pack.out_dir}: {pack.layers} layer and option files, {pack.probes} rank-multiple probes and the model "
        f"({pack.bytes / 1e6:.1f} MB), manifest {pack.manifest.name}\n"
        f"on the device: python {pack.out_dir / 'device_bench.py'} {pack.out_dir} --out table.json [--provider NAME]"
    )
    return EXIT_OK
