"""The ``fxdecomp`` command line: compress, inspect, export, bench, apply, demo.

Exit codes: 0 success, 2 bad usage or bad input, 1 any other failure. Errors print as
one line (``fxdecomp: error: ...``) and a hint; ``--verbose`` adds the traceback.

Example::

    fxdecomp compress mypkg.models:resnet18 --input-shape 1,3,224,224 --budget 0.5 \\
        --out small.pt --onnx small.onnx --report report.html --plan plan.json
    fxdecomp apply plan.json mypkg.models:resnet18 --input-shape 1,3,224,224 --onnx small.onnx
    python -m fxdecomp demo
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
REPORT_FORMATS = {".md": "md", ".markdown": "md", ".json": "json", ".html": "html", ".htm": "html"}
MODEL_HELP = (
    "the model: 'package.module:factory' (a function or class called with no arguments, importable from the "
    "current directory), or a file saved with torch.save(model) of a whole nn.Module. Such a file is loaded "
    "with torch.load(weights_only=False), which runs code stored in it: load only files you trust"
)


class UsageError(Exception):
    """Bad usage found after parsing: a missing file, a path clash, an unreadable input. Exit 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# ---- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1 or 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    verbose, quiet = args.verbose, args.quiet
    with _console(verbose, quiet):
        try:
            return args.run(args) or EXIT_OK
        except KeyboardInterrupt:
            _error("interrupted", None, verbose)
            return 130
        except Exception as exc:  # one line per error; the traceback only when asked
            code, hint = _classify(exc)
            _error(str(exc) or type(exc).__name__, hint, verbose)
            return code


def _classify(exc: BaseException) -> tuple[int, str | None]:
    """(exit code, hint) for an exception."""
    from .errors import BudgetError, ExportError, InvalidInputError, RecipeError, TraceError, UnknownMethodError, UnsupportedLayerError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, exc.hint
    if isinstance(exc, BudgetError):
        reachable = getattr(exc, "smallest_reachable", None)
        hint = f"the smallest reachable budget is {reachable:.4g}; pass --budget {math.ceil(reachable * 1000) / 1000:g} or more" if reachable else None
        return EXIT_USAGE, hint
    if isinstance(exc, UnknownMethodError):
        return EXIT_USAGE, "pass --methods as a comma-separated list of the known methods, e.g. --methods svd,tucker2"
    if isinstance(exc, RecipeError):
        return EXIT_USAGE, "pass --recipe a recipe name from passes/ or a path to a .toml file"
    if isinstance(exc, TraceError):
        return EXIT_USAGE, "exclude the untraceable part with --exclude, or make the forward traceable; --verbose shows the traceback"
    if isinstance(exc, (InvalidInputError, UnsupportedLayerError)):
        return EXIT_USAGE, None
    if isinstance(exc, ExportError):
        return EXIT_FAILURE, "--verbose shows the exporter's traceback"
    return EXIT_FAILURE, "run again with --verbose for the traceback"


def _error(message: str, hint: str | None, verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    line = " ".join(message.split())
    if len(line) > 800 and not verbose:
        line = line[:800] + " ... (--verbose prints all of it)"
    print(f"fxdecomp: error: {line}", file=sys.stderr)
    if hint:
        print(f"fxdecomp: hint: {hint}", file=sys.stderr)


@contextlib.contextmanager
def _console(verbose: bool, quiet: bool) -> Iterator[None]:
    """Warnings as one line each (fxdecomp's own only, unless --verbose); log records with --verbose."""
    package_dir = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if quiet or not (verbose or str(filename).startswith(package_dir)):
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


class Progress:
    """Step lines on stderr (``fxdecomp: exporting ... 1.2 s``), only on a terminal and without --quiet."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        print(f"fxdecomp: {what} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"fxdecomp:   {text}", file=sys.stderr, flush=True)


# ---- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with errors in the one-line format, a hint pointing at --help, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"fxdecomp: error: {message}", file=sys.stderr)
        print(f"fxdecomp: hint: see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on error, and fxdecomp's log")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines and no warnings (results still print)")
    common.add_argument(
        "--threads", type=_positive_int, default=1, metavar="N",
        help="CPU threads for torch and onnxruntime (default 1: steady timings, and MKL's SVD can stall with more)",
    )  # fmt: skip

    parser = _Parser(
        prog="fxdecomp",
        description="Make trained PyTorch models cheaper by low-rank decomposition (a torch.fx compiler pass). "
        "FLOPs count one multiply-add as 2 FLOPs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fxdecomp demo\n  fxdecomp compress mypkg.models:resnet18 --input-shape 1,3,224,224 --budget 0.5 --onnx small.onnx",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, example: str, run: Callable, note: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"{note}example:\n  {example}",
        )  # fmt: skip
        sub.set_defaults(run=run)
        return sub

    sub = command(
        "compress", "decompose a model's Linear and conv (1-3d, transposed too) layers under one budget and write the artifacts",
        "fxdecomp compress mypkg.models:resnet18 --weights r18.pt --input-shape 1,3,224,224 --budget 0.5 \\\n"
        "      --out small.pt --onnx small.onnx --report report.html --plan plan.json",
        _cmd_compress,
        note="--out is a torch.fx.GraphModule saved whole; load it with\n"
        "  gm = torch.load('small.pt', weights_only=False)   # needs fxdecomp importable; trusted files only\n\n",
    )  # fmt: skip
    _model_args(sub)
    _input_args(sub)
    sub.add_argument("--budget", default="0.5", help="fraction of the model's FLOPs to keep (0.5), or params:F / flops:F (default 0.5)")
    sub.add_argument("--methods", help="comma-separated methods to allow, e.g. svd,tucker2 (default: the recipe's; default recipe: svd,spatial_svd,tucker2)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob left alone (repeatable)")
    sub.add_argument("--recipe", help="pass pipeline: a recipe name in passes/ (default, fast, hardware, thorough) or a .toml path")
    sub.add_argument("--calibration", metavar="FILE", help="torch.save'd list of input tuples: activation-aware planning")
    sub.add_argument(
        "--dynamic-shapes", choices=("auto", "static"), default="auto",
        help="torch.export capture: 'auto' leaves batch and sequence dims free where the model allows (default); 'static' fixes the example's shapes",
    )  # fmt: skip
    _output_args(sub)
    sub.add_argument("--latency", action="store_true", help="measure onnxruntime latency of the original and the result (summary, report)")

    sub = command(
        "inspect", "the annotated per-layer table: FLOPs, parameters, VBMF and energy ranks; nothing is rewritten",
        "fxdecomp inspect mypkg.models:resnet18 --input-shape 1,3,224,224 --methods svd,tucker2 --json",
        _cmd_inspect,
    )  # fmt: skip
    _model_args(sub)
    _input_args(sub)
    sub.add_argument("--methods", default="svd,tucker2", help="methods to estimate ranks for (default svd,tucker2)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob to mark excluded")
    sub.add_argument("--json", action="store_true", help="print JSON instead of the table")

    sub = command(
        "export", "export a model (a factory, a saved model, or a compressed .pt) to ONNX, checked in onnxruntime",
        "fxdecomp export small.pt --input-shape 1,3,224,224 --out small.onnx",
        _cmd_export,
    )  # fmt: skip
    _model_args(sub)
    _input_args(sub)
    sub.add_argument("--out", required=True, help="the .onnx file to write")
    sub.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default 18)")
    sub.add_argument("--static-batch", action="store_true", help="fix the batch dimension (default: dynamic)")

    sub = command(
        "bench", "compare two ONNX models side by side: FLOPs, parameters, median latency (interleaved), efficiency",
        "fxdecomp bench original.onnx small.onnx --input-shape 1,3,224,224 --threads 1",
        _cmd_bench,
    )  # fmt: skip
    sub.add_argument("original", help="the original model's .onnx")
    sub.add_argument("compressed", help="the compressed model's .onnx")
    _input_args(sub, required=False)
    sub.add_argument("--rounds", type=_positive_int, default=50, help="timed runs of each model (default 50)")
    sub.add_argument("--warmup", type=_positive_int, default=10, help="untimed runs first (default 10)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _provider_args(sub)

    sub = command(
        "latency-pack", "write the ONNX file of every structure the planner may pick, to time on the target device",
        "fxdecomp latency-pack mypkg.models:resnet18 --input-shape 1,3,224,224 --out pack/\n"
        "  # on the device (onnxruntime + numpy only):  python pack/device_bench.py pack/ --out table.json\n"
        "  # then plan from it: a recipe whose plan options hold latency_table = \"table.json\"",
        _cmd_latency_pack,
    )  # fmt: skip
    _model_args(sub)
    _input_args(sub)
    sub.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    sub.add_argument("--methods", help="comma-separated methods, as you will give compress (default: the recipe's)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob left alone (repeatable)")
    sub.add_argument("--recipe", help="pass pipeline whose plan options (grid, round_to) the pack follows (default: default)")

    sub = command(
        "apply", "re-apply a saved plan (--plan of compress) to the same model: the same structure, no search",
        "fxdecomp apply plan.json mypkg.models:resnet18 --weights r18.pt --input-shape 1,3,224,224 --onnx small.onnx",
        _cmd_apply,
    )  # fmt: skip
    sub.add_argument("plan_file", metavar="PLAN", help="plan.json written by 'fxdecomp compress --plan'")
    _model_args(sub)
    _input_args(sub)
    sub.add_argument("--recipe", help="pass pipeline (default: the one the plan was made with)")
    _output_args(sub)
    sub.add_argument("--latency", action="store_true", help="measure onnxruntime latency of the original and the result")

    sub = command(
        "demo", "the main job, offline: train a small CNN on scikit-learn's digits, compress, export, benchmark",
        "fxdecomp demo --out-dir demo/",
        _cmd_demo,
    )  # fmt: skip
    sub.add_argument("--out-dir", help="keep the artifacts here (ONNX files, report.html, plan.json); default: a temp dir")
    sub.add_argument("--budget", default="0.5", help="fraction of FLOPs to keep (default 0.5)")
    sub.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default 5, ~7 s on one core)")
    sub.add_argument("--methods", help="comma-separated methods (default: the default recipe's)")
    return parser


def _provider_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider (default CPUExecutionProvider)")
    sub.add_argument(
        "--provider-option", action="append", default=[], metavar="KEY=VALUE", help="an option of the provider (repeatable)"
    )


def _provider_options(args: argparse.Namespace) -> dict[str, str]:
    options = {}
    for text in args.provider_option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --provider-option {text!r}", "give KEY=VALUE, e.g. --provider-option device_id=0")
        options[key] = value
    return options


def _model_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    sub.add_argument("--weights", metavar="FILE", help="a state_dict (torch.save'd) to load into the factory's model")


def _input_args(sub: argparse.ArgumentParser, required: bool = True) -> None:
    group = sub.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--input-shape", action="append", metavar="N,C,H,W",
        help="shape of one float32 input, filled with seeded random values (repeat for several inputs)"
        + ("" if required else "; default: the model's declared inputs with batch 1"),
    )  # fmt: skip
    group.add_argument("--inputs", metavar="FILE", help="example inputs: a tensor or a tuple of tensors saved with torch.save")


def _output_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--out", metavar="FILE.pt", help="the compressed GraphModule, torch.save'd whole")
    sub.add_argument("--onnx", metavar="FILE.onnx", help="the compressed model exported to ONNX (checked in onnxruntime)")
    sub.add_argument("--report", metavar="FILE", help="the report: .md, .json or .html (by extension)")
    sub.add_argument("--plan", metavar="FILE.json", help="the decisions as JSON, for 'fxdecomp apply'")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---- commands -----------------------------------------------------------------------------


def _cmd_compress(args: argparse.Namespace) -> int:
    return _compress_like(args, plan=None)


def _cmd_apply(args: argparse.Namespace) -> int:
    plan = _read_json(args.plan_file, "plan")
    if not isinstance(plan, (dict, list)):
        raise UsageError(f"{args.plan_file!r} holds no plan (a JSON object or list)", "give the --plan file of 'fxdecomp compress'")
    return _compress_like(args, plan=plan)


def _compress_like(args: argparse.Namespace, plan: Any) -> int:
    from .recipes import available_recipes

    outputs = _outputs(args)
    _check_paths(outputs, _input_paths(args))
    progress = Progress(args.quiet)
    torch = _torch(args.threads)
    import fxdecomp

    with progress.step("loading the model"):
        model = load_model(args.model, args.weights)
        inputs = load_inputs(args.input_shape, args.inputs)
    if plan is None:
        budget = parse_budget(args.budget)
        methods = _split(args.methods)
        calibration = _load_calibration(args.calibration) if args.calibration else None
        recipe = args.recipe
    else:
        budget, methods, calibration = 0.5, None, None  # a fixed plan needs none of them
        saved = plan.get("pipeline") if isinstance(plan, dict) else None
        recipe = args.recipe or (saved if saved in available_recipes() else None)
    with progress.step("compressing (trace, analyse, plan, rewrite, verify)"):
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
            with progress.step(f"exporting {onnx_path}"):
                fxdecomp.export_onnx(result.graph_module, inputs, onnx_path)
        if args.latency:
            from .benchmark import compare_latency

            original = os.path.join(scratch, "original.onnx")
            with progress.step("exporting the original model for timing"):
                fxdecomp.export_onnx(model, inputs, original)
            with progress.step("timing both in onnxruntime (interleaved)"):
                latency = compare_latency(original, onnx_path, inputs, threads=args.threads)
    if "--out" in outputs:
        with progress.step(f"writing {outputs['--out']}"):
            atomic_write(outputs["--out"], lambda tmp: torch.save(result.graph_module, tmp))
    if "--plan" in outputs:
        atomic_write_text(outputs["--plan"], json.dumps(result.to_dict(), indent=2, allow_nan=False))
    if "--report" in outputs:
        with progress.step(f"writing {outputs['--report']}"):
            atomic_write_text(outputs["--report"], render_report(result, outputs["--report"], latency))
    print(summary_table(result, latency))
    written = [f"{flag[2:]} {path}" for flag, path in outputs.items()]
    if written:
        print("wrote: " + ", ".join(written))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import RANK_FRACTIONS, inspect_model

    _torch(args.threads)
    progress = Progress(args.quiet)
    with progress.step("loading the model"):
        model = load_model(args.model, args.weights)
        inputs = load_inputs(args.input_shape, args.inputs)
    with progress.step("analysing (shapes, candidates, costs, rank estimates)"):
        layers = inspect_model(model, inputs, methods=_split(args.methods) or (), exclude=args.exclude)
    if args.json:
        print(json.dumps({"flops_convention": "FLOPs = 2 x multiply-adds", "layers": [l.to_dict() for l in layers]}, indent=2))
        return EXIT_OK
    header = ["layer", "op", "weight", "FLOPs", "params", "method", "max", "VBMF", "E90", "E99"]
    header += [f"kept@{f:g}" for f in RANK_FRACTIONS]
    rows = []
    for layer in layers:
        first = [layer.name + (" (excluded)" if layer.excluded else ""), layer.op, "x".join(map(str, layer.weight_shape)), _num(layer.flops), _num(layer.params)]
        if not layer.estimates:
            rows.append(first + ["-"] * (len(header) - len(first)))
        for k, e in enumerate(layer.estimates):
            kept = ["/".join(f"{x:.0%}" for x in at.energy) for at in e.energy_kept]
            rows.append((first if k == 0 else [""] * len(first)) + [e.method, _ranks(e.max_ranks), _ranks(e.vbmf), _ranks(e.energy_90), _ranks(e.energy_99), *kept])
    print(format_table(header, rows, numeric={3, 4}))
    total = sum(l.flops for l in layers)
    print(
        f"{len(layers)} candidate layers, {_num(total)} FLOPs (2 x multiply-adds) in them. Ranks: input side first; "
        "E90/E99: smallest ranks keeping 90/99 % of the spectrum's energy; "
        + ", ".join(f"kept@{f:g}: energy kept at {f:.0%} of the maximum rank" for f in RANK_FRACTIONS)
        + "."
    )
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import fxdecomp

    _check_paths({"--out": args.out}, _input_paths(args))
    _torch(args.threads)
    progress = Progress(args.quiet)
    with progress.step("loading the model"):
        model = load_model(args.model, args.weights)
        inputs = load_inputs(args.input_shape, args.inputs)
    with progress.step(f"exporting {args.out}"):
        report = fxdecomp.export_onnx(model, inputs, args.out, opset=args.opset, dynamic_batch=not args.static_batch)
    diff = f"max abs diff vs torch {report.max_abs_diff:.3g}" if report.max_abs_diff is not None else "parity not checked"
    print(f"wrote {report.path} (opset {report.opset}; inputs {', '.join(map(str, report.inputs))}; {diff})")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import compare_latency
    from .onnx_flops import onnx_flops, onnx_params

    _torch(args.threads)
    for path in (args.original, args.compressed):
        if not os.path.isfile(path):
            raise UsageError(f"no ONNX file {path!r}", "export one with 'fxdecomp export' or 'fxdecomp compress --onnx'")
    inputs = load_inputs(args.input_shape, args.inputs) if (args.input_shape or args.inputs) else declared_inputs(args.original)
    progress = Progress(args.quiet)
    with progress.step("counting FLOPs"):
        flops = [onnx_flops(p, inputs) for p in (args.original, args.compressed)]
        params = [onnx_params(p) for p in (args.original, args.compressed)]
    with progress.step(f"timing both models, {args.rounds} interleaved rounds"):
        latency = compare_latency(
            args.original, args.compressed, inputs, threads=args.threads, rounds=args.rounds, warmup=args.warmup,
            provider=args.provider, provider_options=_provider_options(args),
        )  # fmt: skip
    speedup = latency.a.median_ms / latency.b.median_ms if latency.b.median_ms > 0 else math.inf
    reduction = flops[0] / flops[1] if flops[1] else math.inf
    efficiency = speedup / reduction if math.isfinite(reduction) and reduction > 0 else None
    if args.json:
        data = {
            "flops_convention": "FLOPs = 2 x multiply-adds (Conv, ConvTranspose, Gemm, MatMul)",
            "input_shapes": [list(x.shape) for x in inputs],
            "provider": args.provider,
            "provider_options": _provider_options(args),
            "original": {"path": args.original, "flops": flops[0], "params": params[0], "latency": latency.a.to_dict()},
            "compressed": {"path": args.compressed, "flops": flops[1], "params": params[1], "latency": latency.b.to_dict()},
            "speedup": speedup if math.isfinite(speedup) else None,
            "flop_reduction": reduction if math.isfinite(reduction) else None,
            "efficiency": efficiency,
        }
        print(json.dumps(data, indent=2, allow_nan=False))
        return EXIT_OK
    rows = [
        ["FLOPs (2 x MACs)", _num(flops[0]), _num(flops[1]), f"{reduction:.2f}x fewer"],
        ["parameters", _num(params[0]), _num(params[1]), f"{params[0] / max(params[1], 1):.2f}x fewer"],
        ["median latency (ms)", f"{latency.a.median_ms:.3f}", f"{latency.b.median_ms:.3f}", _speed(speedup)],
        ["p10-p90 (ms)", _spread(latency.a), _spread(latency.b), ""],
    ]
    print(format_table(["", "original", "compressed", "ratio"], rows, numeric={1, 2}))
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
    eff = f"{efficiency:.2f}" if efficiency is not None else "n/a"
    print(
        f"efficiency = speed-up / FLOP reduction = {eff} (1.0: latency follows FLOPs). onnxruntime {args.provider}, "
        f"{args.threads} thread(s), inputs {shapes}, {latency.a.runs} interleaved runs each."
    )
    return EXIT_OK


def _cmd_latency_pack(args: argparse.Namespace) -> int:
    from .latency_pack import latency_pack

    _torch(args.threads)
    progress = Progress(args.quiet)
    with progress.step("loading the model"):
        model = load_model(args.model, args.weights)
        inputs = load_inputs(args.input_shape, args.inputs)
    with progress.step(f"writing the latency pack {args.out}"):
        pack = latency_pack(model, inputs, args.out, methods=_split(args.methods), exclude=args.exclude, pipeline=args.recipe)
    print(
        f"wrote {pack.out_dir}: {pack.layers} layer and option files, {pack.probes} rank-multiple probes and the model "
        f"({pack.bytes / 1e6:.1f} MB), manifest {pack.manifest.name}\n"
        f"on the device: python {pack.out_dir / 'device_bench.py'} {pack.out_dir} --out table.json [--provider NAME]"
    )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import digits

    torch = _torch(args.threads)
    import fxdecomp
    from .benchmark import compare_latency

    budget = parse_budget(args.budget)
    methods = _split(args.methods)
    out_dir = args.out_dir
    if out_dir is not None and not os.path.isdir(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    progress = Progress(args.quiet)
    with progress.step("loading scikit-learn's digits"):
        train, test = digits.load_digits_split()
    torch.manual_seed(0)
    model = digits.DigitsCNN()
    start = time.perf_counter()
    with progress.step(f"training DigitsCNN, {args.epochs} epochs"):
        digits.train_classifier(model, train, epochs=args.epochs)
    train_seconds = time.perf_counter() - start
    example = (test.images[:1],)
    start = time.perf_counter()
    with progress.step("compressing"):
        result = fxdecomp.compress(model, example, budget, methods=methods)
    compress_seconds = time.perf_counter() - start
    acc = (digits.accuracy(model, test), digits.accuracy(result.graph_module, test))
    with contextlib.ExitStack() as stack:
        folder = out_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fxdecomp-demo-"))
        paths = (os.path.join(folder, "original.onnx"), os.path.join(folder, "compressed.onnx"))
        with progress.step("exporting both models to ONNX"):
            for module, path in zip((model, result.graph_module), paths):
                fxdecomp.export_onnx(module, example, path)
        with progress.step("timing both in onnxruntime"):
            latency = compare_latency(*paths, example, threads=args.threads, rounds=100)
        if out_dir:
            atomic_write_text(os.path.join(out_dir, "report.html"), render_report(result, "report.html", latency))
            atomic_write_text(os.path.join(out_dir, "report.md"), render_report(result, "report.md", latency))
            atomic_write_text(os.path.join(out_dir, "plan.json"), json.dumps(result.to_dict(), indent=2, allow_nan=False))
        speedup = latency.a.median_ms / latency.b.median_ms
        print(
            f"fxdecomp demo: DigitsCNN on scikit-learn's digits ({len(train.labels)} train / {len(test.labels)} test "
            f"images, 16x16); trained {args.epochs} epochs in {train_seconds:.1f} s, compressed to a budget of "
            f"{_budget_text(result.budget)} in {compress_seconds:.1f} s, no fine-tuning.\n"
        )
        rows = [
            ["test accuracy", f"{acc[0]:.1%}", f"{acc[1]:.1%}", f"{(acc[1] - acc[0]) * 100:+.1f} points"],
            ["FLOPs (2 x MACs)", _num(result.flops_before), _num(result.flops_after), f"{result.flops_ratio:.1%}"],
            ["parameters", _num(result.params_before), _num(result.params_after), f"{result.params_ratio:.1%}"],
            ["median latency (ms)", f"{latency.a.median_ms:.3f}", f"{latency.b.median_ms:.3f}", _speed(speedup)],
        ]
        print(format_table(["", "original", "compressed", "after/before"], rows, numeric={1, 2}))
        print(f"(latency: onnxruntime CPU, {args.threads} thread(s), batch 1, {latency.a.runs} interleaved runs)\n")
        print(layers_table(result))
        where = f"artifacts in {out_dir}: original.onnx, compressed.onnx, report.html, report.md, plan.json" if out_dir else "ONNX files were in a temporary directory (keep them with --out-dir DIR)"
        print(f"\n{where}")
    return EXIT_OK


# ---- loading ------------------------------------------------------------------------------


def load_model(spec: str, weights: str | None = None):
    """An nn.Module from 'package.module:factory' or a torch.save'd model file; ``weights`` a state_dict file."""
    torch = _torch()
    from torch import nn

    if os.path.isfile(spec):
        try:
            model = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UsageError(f"cannot load {spec!r} with torch.load: {exc}", "give a file written by torch.save(model)") from exc
        if isinstance(model, dict):
            raise UsageError(
                f"{spec!r} holds a dict (a state_dict?), not a model",
                "give the model as package.module:factory and the state_dict with --weights FILE",
            )
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise UsageError(
            f"no model file {spec!r}, and it is not of the form package.module:factory",
            "MODEL is package.module:factory (importable from the current directory) or a file saved with torch.save(model)",
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = _torch_load(weights, "--weights")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UsageError(f"--weights {weights!r} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"the weights in {weights!r} do not fit the model: {exc}") from exc
    return model.eval()


def _from_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the console script does not put the working directory on sys.path
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import module {module_name!r} of {spec!r}: {exc}",
            "MODEL is package.module:factory, importable from the current directory (or installed)",
        ) from exc
    target: Any = module
    for part in attr.split("."):
        if not part or not hasattr(target, part):
            raise UsageError(f"module {module_name!r} has no {attr!r}", f"name a function or class defined in {module_name}")
        target = getattr(target, part)
    if not callable(target):
        return target
    try:
        return target()
    except Exception as exc:
        raise RuntimeError(f"the factory {spec} raised {type(exc).__name__}: {exc}") from exc


def load_inputs(shapes: Sequence[str] | None, path: str | None) -> tuple:
    """Example inputs from ``--input-shape`` strings (seeded random float32) or a torch.save'd file."""
    torch = _torch()
    if path:
        value = _torch_load(path, "--inputs")
        items = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(items, (tuple, list)) or not items or not all(isinstance(x, torch.Tensor) for x in items):
            raise UsageError(f"--inputs {path!r} must hold a tensor or a tuple of tensors, got {type(value).__name__}")
        return tuple(items)
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(parse_shape(s), generator=generator) for s in shapes or ())


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}", "give positive integers separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def declared_inputs(onnx_path: str) -> tuple:
    """Inputs matching an ONNX model's declared inputs, symbolic dims (the batch) set to 1."""
    import numpy as np

    from .benchmark import io_info, open_session

    session = open_session(onnx_path)
    arrays = []
    generator = np.random.default_rng(0)
    for info in io_info(session.get_inputs()):
        shape = tuple(d if isinstance(d, int) else 1 for d in info.shape)
        if info.dtype.startswith("float"):
            arrays.append(generator.standard_normal(shape).astype(info.dtype))
        else:
            arrays.append(np.zeros(shape, dtype=info.dtype))
    return tuple(arrays)


def parse_budget(text: str):
    """'0.5' -> a FLOP fraction; 'params:0.3' / 'flops:0.5' / 'latency:0.7' -> that Budget."""
    from .budget import Budget
    from .errors import BudgetError

    metric, _, value = str(text).rpartition(":")
    metric = metric.strip().lower() or "flops"
    if metric not in ("flops", "params", "latency"):
        raise BudgetError(f"unknown budget metric {metric!r} in --budget {text!r}; use flops:F, params:F or a plain fraction")
    try:
        fraction = float(value)
    except ValueError:
        raise BudgetError(f"--budget {text!r} is not a fraction; give e.g. 0.5, params:0.3 or flops:0.5") from None
    return Budget(**{metric: fraction})


def _load_calibration(path: str) -> list[tuple]:
    torch = _torch()
    value = _torch_load(path, "--calibration")
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)) or not value:
        raise UsageError(
            f"--calibration {path!r} must hold a non-empty list of input tuples, got {type(value).__name__}",
            "save it with torch.save([(x1,), (x2,), ...], 'calibration.pt')",
        )
    batches = []
    for item in value:
        batch = (item,) if isinstance(item, torch.Tensor) else tuple(item) if isinstance(item, (list, tuple)) else None
        if not batch or not all(isinstance(x, torch.Tensor) for x in batch):
            raise UsageError(f"--calibration {path!r}: every entry must be a tensor or a tuple of tensors")
        batches.append(batch)
    return batches


def _torch_load(path: str, flag: str):
    torch = _torch()
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{flag}: cannot load {path!r} (torch.load, weights_only=True): {exc}") from exc


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UsageError(f"no {what} file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path!r} as JSON: {exc}") from exc


def _torch(threads: int | None = None):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch


def _split(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


# ---- outputs ------------------------------------------------------------------------------


def _outputs(args: argparse.Namespace) -> dict[str, str]:
    outputs = {flag: getattr(args, flag[2:]) for flag in ("--out", "--onnx", "--report", "--plan") if getattr(args, flag[2:], None)}
    report = outputs.get("--report")
    if report and Path(report).suffix.lower() not in REPORT_FORMATS:
        raise UsageError(f"--report {report!r}: unknown format", "end the file name in .md, .json or .html")
    return outputs


def _input_paths(args: argparse.Namespace) -> list[str]:
    candidates = [getattr(args, name, None) for name in ("model", "weights", "inputs", "calibration", "recipe", "plan_file")]
    return [p for p in candidates if p and os.path.exists(p)]


def _check_paths(outputs: dict[str, str], inputs: Sequence[str]) -> None:
    """Refuse an output that is an input, two outputs on one path, or a path in a missing directory."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        real = os.path.realpath(path)
        for source in inputs:
            if real == os.path.realpath(source) or (os.path.exists(path) and os.path.samefile(path, source)):
                raise UsageError(f"{flag} {path!r} is an input of this command; refusing to overwrite it", "write the output elsewhere")
        if real in seen:
            raise UsageError(f"{flag} and {seen[real]} both write {path!r}", "give each output its own file")
        seen[real] = flag
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a directory", "give a file path")
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path!r}: directory {parent!r} does not exist", "create it first")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file beside ``path``, then move it over ``path`` in one step."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def render_report(result, path: str | os.PathLike, latency=None) -> str:
    """The report in the format that ``path``'s extension names (.md, .json, .html)."""
    kind = REPORT_FORMATS.get(Path(path).suffix.lower(), "md")
    if kind == "html":
        from .report_html import render_html

        return render_html(result, latency)
    if kind == "json":
        data = result.to_dict()
        if latency is not None:
            ratio = latency.ratio if math.isfinite(latency.ratio) else None
            data["latency"] = {"original": latency.a.to_dict(), "compressed": latency.b.to_dict(), "ratio": ratio}
        return json.dumps(data, indent=2, allow_nan=False)
    text = result.report()
    if latency is not None:
        text += (
            f"\n\nMedian onnxruntime latency: {latency.a.median_ms:.3f} ms -> {latency.b.median_ms:.3f} ms "
            f"({latency.a.threads} thread(s), {latency.a.runs} interleaved runs)."
        )
    return text + "\n"


# ---- tables -------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset()) -> str:
    """A plain-text table; columns in ``numeric`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def layers_table(result) -> str:
    rows = []
    for d in result.decisions:
        method = d.method if d.decomposed or not d.reason else f"keep ({d.reason})"
        rows.append([d.name, method, _ranks(d.ranks), _num(d.flops_before), _num(d.flops_after), f"{d.error:.3g}" if d.decomposed else "-"])
    return format_table(["layer", "method", "ranks", "FLOPs before", "FLOPs after", "pred. error"], rows, numeric={3, 4, 5})


def summary_table(result, latency=None) -> str:
    lines = [
        layers_table(result),
        "",
        f"FLOPs {_num(result.flops_before)} -> {_num(result.flops_after)} ({result.flops_ratio:.1%}), "
        f"parameters {_num(result.params_before)} -> {_num(result.params_after)} ({result.params_ratio:.1%}); "
        "FLOPs = 2 x multiply-adds."
        + (f" Output relative error on the example inputs: {result.output_error:.3g}." if result.output_error is not None else ""),
    ]
    if latency is not None:
        lines.append(
            f"Median onnxruntime latency {latency.a.median_ms:.3f} ms -> {latency.b.median_ms:.3f} ms "
            f"({_speed(latency.a.median_ms / latency.b.median_ms)}, {latency.a.threads} thread(s))."
        )
    return "\n".join(lines)


def _num(value: int) -> str:
    from .result import _num as short

    return short(value)


def _ranks(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks)) if ranks else "-"


def _speed(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _spread(stats) -> str:
    return f"{stats.p10_ms:.3f}-{stats.p90_ms:.3f}"


def _budget_text(budget: dict) -> str:
    names = {"flops": "FLOPs", "params": "parameters"}
    return ", ".join(f"{v:g} of its {names.get(k, k)}" for k, v in budget.items())


if __name__ == "__main__":
    sys.exit(main())
