"""``fxdecomp inspect``: the annotated per-layer table (FLOPs, parameters, rank estimates); nothing is rewritten."""

from __future__ import annotations

import argparse
import json

from ..progress import Progress
from ..report.text import format_table, num, ranks_text
from .args import AddCommand, input_args, model_args
from .errors import EXIT_OK
from .loading import load_model_and_inputs, split_list, use_torch


def register(command: AddCommand) -> None:
    sub = command(
        "inspect", "the annotated per-layer table: FLOPs, parameters, VBMF and energy ranks; nothing is rewritten",
        "fxdecomp inspect mypkg.models:resnet18 --input-shape 1,3,224,224 --methods svd,tucker2 --json",
        run,
    )  # fmt: skip
    model_args(sub)
    input_args(sub)
    sub.add_argument("--methods", default="svd,tucker2", help="methods to estimate ranks for (default svd,tucker2)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob to mark excluded")
    sub.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..inspect import RANK_FRACTIONS, inspect_model

    use_torch(args.threads)
    progress = Progress.on_terminal(args.quiet)
    model, inputs = load_model_and_inputs(args, progress)
    with progress.stage("analysing (shapes, candidates, costs, rank estimates)"):
        layers = inspect_model(model, inputs, methods=split_list(args.methods) or (), exclude=args.exclude)
    if args.json:
        print(json.dumps({"flops_convention": "FLOPs = 2 x multiply-adds", "layers": [l.to_dict() for l in layers]}, indent=2))
        return EXIT_OK
    header = ["layer", "op", "weight", "FLOPs", "params", "method", "max", "VBMF", "E90", "E99"]
    header += [f"kept@{f:g}" for f in RANK_FRACTIONS]
    rows = []
    for layer in layers:
        first = [layer.name + (" (excluded)" if layer.excluded else ""), layer.op, "x".join(map(str, layer.weight_shape)), num(layer.flops), num(layer.params)]
        if not layer.estimates:
            rows.append(first + ["-"] * (len(header) - len(first)))
        for k, e in enumerate(layer.estimates):
            kept = ["/".join(f"{x:.0%}" for x in at.energy) for at in e.energy_kept]
            rows.append((first if k == 0 else [""] * len(first)) + [e.method, ranks_text(e.max_ranks), ranks_text(e.vbmf), ranks_text(e.energy_90), ranks_text(e.energy_99), *kept])
    print(format_table(header, rows, numeric={3, 4}))
    total = sum(l.flops for l in layers)
    print(
        f"{len(layers)} candidate layers, {num(total)} FLOPs (2 x multiply-adds) in them. Ranks: input side first; "
        "E90/E99: smallest ranks keeping 90/99 % of the spectrum's energy; "
        + ", ".join(f"kept@{f:g}: energy kept at {f:.0%} of the maximum rank" for f in RANK_FRACTIONS)
        + "."
    )
    return EXIT_OK
