"""``fxdecomp compress`` and ``fxdecomp apply``: decompose a model (searching, or re-applying a saved plan) and write the artifacts."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from ..onnxrt.files import atomic_write, atomic_write_text
from ..progress import Progress
from ..report import render_report
from ..report.text import summary_table
from .args import AddCommand, input_args, model_args, output_args
from .errors import EXIT_OK, UsageError
from .loading import load_calibration, load_model_and_inputs, parse_budget, read_json, split_list, use_torch
from .outputs import check_paths, input_paths, requested_outputs

OUT_NOTE = (
    "--out is a torch.fx.GraphModule saved whole; load it with\n"
    "  gm = torch.load('small.pt', weights_only=False)   # needs fxdecomp importable; trusted files only\n\n"
)


def register(command: AddCommand) -> None:
    sub = command(
        "compress", "decompose a model's Linear and conv (1-3d, transposed too) layers under one budget and write the artifacts",
        "fxdecomp compress mypkg.models:resnet18 --weights r18.pt --input-shape 1,3,224,224 --budget 0.5 \\\n"
        "      --out small.pt --onnx small.onnx --report report.html --plan plan.json",
        run_compress, note=OUT_NOTE,
    )  # fmt: skip
    model_args(sub)
    input_args(sub)
    sub.add_argument("--budget", default="0.5", help="fraction of the model's FLOPs to keep (0.5), or params:F / flops:F (default 0.5)")
    sub.add_argument("--methods", help="comma-separated methods to allow, e.g. svd,tucker2 (default: the recipe's; default recipe: svd,spatial_svd,tucker2)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob left alone (repeatable)")
    sub.add_argument(
        "--recipe",
        help="pass pipeline: a recipe name in passes/ (default: plans that keep their savings in onnxruntime on this CPU; "
        "flops: the plain FLOP plan, the same on every machine; fast, hardware, thorough, ...) or a .toml path",
    )
    sub.add_argument(
        "--calibration", metavar="FILE",
        help="torch.save'd list of input tuples: activation-aware planning; 'distilled': inputs distilled from the "
        "model's BatchNorm statistics (ZeroQ, fxdecomp.distilled_batches) when there is no data",
    )  # fmt: skip
    sub.add_argument(
        "--dynamic-shapes", choices=("auto", "static"), default="auto",
        help="torch.export capture: 'auto' leaves batch and sequence dims free where the model allows (default); 'static' fixes the example's shapes",
    )  # fmt: skip
    output_args(sub)
    sub.add_argument("--latency", action="store_true", help="measure onnxruntime latency of the original and the result (summary, report)")

    sub = command(
        "apply", "re-apply a saved plan (--plan of compress) to the same model: the same structure, no search",
        "fxdecomp apply plan.json mypkg.models:resnet18 --weights r18.pt --input-shape 1,3,224,224 --onnx small.onnx",
        run_apply,
    )  # fmt: skip
    sub.add_argument("plan_file", metavar="PLAN", help="plan.json written by 'fxdecomp compress --plan'")
    model_args(sub)
    input_args(sub)
    sub.add_argument("--recipe", help="pass pipeline (default: the one the plan was made with)")
    output_args(sub)
    sub.add_argument("--latency", action="store_true", help="measure onnxruntime latency of the original and the result")


def run_compress(args: argparse.Namespace) -> int:
    return _compress_like(args, plan=None)


def run_apply(args: argparse.Namespace) -> int:
    plan = read_json(args.plan_file, "plan")
    if not isinstance(plan, (dict, list)):
        raise UsageError(f"{args.plan_file!r} holds no plan (a JSON object or list)", "give the --plan file of 'fxdecomp compress'")
    return _compress_like(args, plan=plan)


def _compress_like(args: argparse.Namespace, plan: Any) -> int:
    from ..recipes import available_recipes

    outputs = requested_outputs(args)
    check_paths(outputs, input_paths(args))
    progress = Progress.on_terminal(args.quiet)
    torch = use_torch(args.threads)
    import fxdecomp

    model, inputs = load_model_and_inputs(args, progress)
    if plan is None:
        budget = parse_budget(args.budget)
        methods = split_list(args.methods)
        distilled = args.calibration == "distilled" and not os.path.isfile(args.calibration)  # a file of that name wins
        calibration = load_calibration(args.calibration) if args.calibration and not distilled else None
        if distilled:
            with progress.stage("distilling calibration inputs from the BatchNorm statistics"):
                calibration = fxdecomp.distilled_batches(model, inputs, progress=False)
        recipe = args.recipe
    else:
        budget, methods, calibration = 0.5, None, None  # a fixed plan needs none of them
        saved = plan.get("pipeline") if isinstance(plan, dict) else None
        recipe = args.recipe or (saved if saved in available_recipes() else None)
    with progress.stage("compressing (trace, analyse, plan, rewrite, verify)"):
        result = fxdecomp.compress(
            model, inputs, budget, methods=methods, calibration=calibration,
            exclude=getattr(args, "exclude", ()), pipeline=recipe, plan=plan,
            dynamic_shapes=getattr(args, "dynamic_shapes", "auto"),
        )  # fmt: skip
    for name, seconds in result.pass_seconds.items():
        progress.note(f"{name}: {seconds:.2f} s")

    latency = None
    with tempfile.TemporaryDirectory(prefix="fxdecomp-") as scratch:
        onnx_path = outputs.get("--onnx")
        if onnx_path or args.latency:
            onnx_path = onnx_path or os.path.join(scratch, "compressed.onnx")
            with progress.stage(f"exporting {onnx_path}"):
                fxdecomp.export_onnx(result.graph_module, inputs, onnx_path)
        if args.latency:
            from ..onnxrt import compare_latency

            original = os.path.join(scratch, "original.onnx")
            with progress.stage("exporting the original model for timing"):
                fxdecomp.export_onnx(model, inputs, original)
            with progress.stage("timing both in onnxruntime (interleaved)"):
                latency = compare_latency(original, onnx_path, inputs, threads=args.threads)
    if "--out" in outputs:
        with progress.stage(f"writing {outputs['--out']}"):
            atomic_write(outputs["--out"], lambda tmp: torch.save(result.graph_module, tmp))
    if "--plan" in outputs:
        atomic_write_text(outputs["--plan"], json.dumps(result.to_dict(), indent=2, allow_nan=False))
    if "--report" in outputs:
        with progress.stage(f"writing {outputs['--report']}"):
            atomic_write_text(outputs["--report"], render_report(result, outputs["--report"], latency))
    print(summary_table(result, latency))
    written = [f"{flag[2:]} {path}" for flag, path in outputs.items()]
    if written:
        print("wrote: " + ", ".join(written))
    return EXIT_OK


