"""``fxdecomp demo``: the main job, offline: train a small CNN on scikit-learn's digits, compress it, export, time.

Needs scikit-learn (the ``demo`` extra: ``pip install "fxdecomp[demo]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

from ..onnxrt.files import atomic_write_text
from ..progress import Progress
from ..report import render_report
from ..report.text import budget_text, format_table, layers_table, num, speed_text
from .args import AddCommand, positive_int
from .errors import EXIT_OK, UsageError
from .loading import parse_budget, split_list, use_torch


def register(command: AddCommand) -> None:
    sub = command(
        "demo", "the main job, offline: train a small CNN on scikit-learn's digits, compress, export, benchmark",
        "fxdecomp demo --out-dir demo/",
        run,
    )  # fmt: skip
    sub.add_argument("--out-dir", help="keep the artifacts here (ONNX files, report.html, plan.json); default: a temp dir")
    sub.add_argument("--budget", default="0.5", help="fraction of FLOPs to keep (default 0.5)")
    sub.add_argument("--epochs", type=positive_int, default=5, help="training epochs (default 5, ~7 s on one core)")
    sub.add_argument("--methods", help="comma-separated methods (default: the default recipe's)")


def run(args: argparse.Namespace) -> int:
    from .. import digits

    torch = use_torch(args.threads)
    import fxdecomp
    from ..onnxrt import compare_latency

    budget = parse_budget(args.budget)
    methods = split_list(args.methods)
    out_dir = args.out_dir
    if out_dir is not None and not os.path.isdir(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    progress = Progress.on_terminal(args.quiet)
    with progress.stage("loading scikit-learn's digits"):
        try:
            train, test = digits.load_digits_split()
        except ModuleNotFoundError as exc:
            if exc.name != "sklearn":
                raise
            raise UsageError("the demo needs scikit-learn (its digits data set), which is not installed", 'pip install "fxdecomp[demo]"') from None
    torch.manual_seed(0)
    model = digits.DigitsCNN()
    start = time.perf_counter()
    with progress.stage(f"training DigitsCNN, {args.epochs} epochs"):
        digits.train_classifier(model, train, epochs=args.epochs)
    train_seconds = time.perf_counter() - start
    example = (test.images[:1],)
    start = time.perf_counter()
    with progress.stage("compressing"):
        result = fxdecomp.compress(model, example, budget, methods=methods)
    compress_seconds = time.perf_counter() - start
    acc = (digits.accuracy(model, test), digits.accuracy(result.graph_module, test))
    with contextlib.ExitStack() as stack:
        folder = out_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fxdecomp-demo-"))
        paths = (os.path.join(folder, "original.onnx"), os.path.join(folder, "compressed.onnx"))
        with progress.stage("exporting both models to ONNX"):
            for module, path in zip((model, result.graph_module), paths):
                fxdecomp.export_onnx(module, example, path)
        with progress.stage("timing both in onnxruntime"):
            latency = compare_latency(*paths, example, threads=args.threads, rounds=100)
        if out_dir:
            atomic_write_text(os.path.join(out_dir, "report.html"), render_report(result, "report.html", latency))
            atomic_write_text(os.path.join(out_dir, "report.md"), render_report(result, "report.md", latency))
            atomic_write_text(os.path.join(out_dir, "plan.json"), json.dumps(result.to_dict(), indent=2, allow_nan=False))
        speedup = latency.a.median_ms / latency.b.median_ms
        print(
            f"fxdecomp demo: DigitsCNN on scikit-learn's digits ({len(train.labels)} train / {len(test.labels)} test "
            f"images, 16x16); trained {args.epochs} epochs in {train_seconds:.1f} s, compressed to a budget of "
            f"{budget_text(result.budget)} in {compress_seconds:.1f} s, no fine-tuning.\n"
        )
        rows = [
            ["test accuracy", f"{acc[0]:.1%}", f"{acc[1]:.1%}", f"{(acc[1] - acc[0]) * 100:+.1f} points"],
            ["FLOPs (2 x MACs)", num(result.flops_before), num(result.flops_after), f"{result.flops_ratio:.1%}"],
            ["parameters", num(result.params_before), num(result.params_after), f"{result.params_ratio:.1%}"],
            ["median latency (ms)", f"{latency.a.median_ms:.3f}", f"{latency.b.median_ms:.3f}", speed_text(speedup)],
        ]
        print(format_table(["", "original", "compressed", "after/before"], rows, numeric={1, 2}))
        print(f"(latency: onnxruntime CPU, {args.threads} thread(s), batch 1, {latency.a.runs} interleaved runs)\n")
        print(layers_table(result))
        where = f"artifacts in {out_dir}: original.onnx, compressed.onnx, report.html, report.md, plan.json" if out_dir else "ONNX files were in a temporary directory (keep them with --out-dir DIR)"
        print(f"\n{where}")
    return EXIT_OK
