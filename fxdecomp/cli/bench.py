"""``fxdecomp bench``: two ONNX models side by side: FLOPs, parameters, median latency (interleaved), efficiency.

New options of the timing (an execution provider, say) go in `register` and `run` here only.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from ..progress import Progress
from ..report.text import format_table, num, speed_text, spread_text
from .args import AddCommand, input_args, positive_int, provider_args, provider_options
from .errors import EXIT_OK, UsageError
from .loading import load_inputs, use_torch


def register(command: AddCommand) -> None:
    sub = command(
        "bench", "compare two ONNX models side by side: FLOPs, parameters, median latency (interleaved), efficiency",
        "fxdecomp bench original.onnx small.onnx --input-shape 1,3,224,224 --threads 1",
        run,
    )  # fmt: skip
    sub.add_argument("original", help="the original model's .onnx")
    sub.add_argument("compressed", help="the compressed model's .onnx")
    input_args(sub, required=False)
    sub.add_argument("--rounds", type=positive_int, default=50, help="timed runs of each model (default 50)")
    sub.add_argument("--warmup", type=positive_int, default=10, help="untimed runs first (default 10)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of the table")
    provider_args(sub)


def run(args: argparse.Namespace) -> int:
    from ..onnxrt import compare_latency
    from ..onnxrt.flops import onnx_flops, onnx_params

    use_torch(args.threads)
    for path in (args.original, args.compressed):
        if not os.path.isfile(path):
            raise UsageError(f"no ONNX file {path!r}", "export one with 'fxdecomp export' or 'fxdecomp compress --onnx'")
    inputs = load_inputs(args.input_shape, args.inputs) if (args.input_shape or args.inputs) else declared_inputs(args.original)
    progress = Progress.on_terminal(args.quiet)
    with progress.stage("counting FLOPs"):
        flops = [onnx_flops(p, inputs) for p in (args.original, args.compressed)]
        params = [onnx_params(p) for p in (args.original, args.compressed)]
    with progress.stage(f"timing both models, {args.rounds} interleaved rounds"):
        latency = compare_latency(
            args.original, args.compressed, inputs, threads=args.threads, rounds=args.rounds, warmup=args.warmup,
            provider=args.provider, provider_options=provider_options(args),
        )  # fmt: skip
    speedup = latency.a.median_ms / latency.b.median_ms if latency.b.median_ms > 0 else math.inf
    reduction = flops[0] / flops[1] if flops[1] else math.inf
    efficiency = speedup / reduction if math.isfinite(reduction) and reduction > 0 else None
    if args.json:
        data = {
            "flops_convention": "FLOPs = 2 x multiply-adds (Conv, ConvTranspose, Gemm, MatMul)",
            "input_shapes": [list(x.shape) for x in inputs],
            "provider": args.provider,
            "provider_options": provider_options(args),
            "original": {"path": args.original, "flops": flops[0], "params": params[0], "latency": latency.a.to_dict()},
            "compressed": {"path": args.compressed, "flops": flops[1], "params": params[1], "latency": latency.b.to_dict()},
            "speedup": speedup if math.isfinite(speedup) else None,
            "flop_reduction": reduction if math.isfinite(reduction) else None,
            "efficiency": efficiency,
        }
        print(json.dumps(data, indent=2, allow_nan=False))
        return EXIT_OK
    rows = [
        ["FLOPs (2 x MACs)", num(flops[0]), num(flops[1]), f"{reduction:.2f}x fewer"],
        ["parameters", num(params[0]), num(params[1]), f"{params[0] / max(params[1], 1):.2f}x fewer"],
        ["median latency (ms)", f"{latency.a.median_ms:.3f}", f"{latency.b.median_ms:.3f}", speed_text(speedup)],
        ["p10-p90 (ms)", spread_text(latency.a), spread_text(latency.b), ""],
    ]
    print(format_table(["", "original", "compressed", "ratio"], rows, numeric={1, 2}))
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
    eff = f"{efficiency:.2f}" if efficiency is not None else "n/a"
    print(
        f"efficiency = speed-up / FLOP reduction = {eff} (1.0: latency follows FLOPs). onnxruntime {args.provider}, "
        f"{args.threads} thread(s), inputs {shapes}, {latency.a.runs} interleaved runs each."
    )
    return EXIT_OK


def declared_inputs(onnx_path: str) -> tuple:
    """Inputs matching an ONNX model's declared inputs, symbolic dims (the batch) set to 1."""
    import numpy as np

    from ..onnxrt import io_info, open_session

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
