"""Study: how onnxruntime's latency of decomposed convs depends on rank multiples, and which methods pay off.

For VGG-like 3x3 convs (64@224, 128@112, 256@56, 512@28), times in onnxruntime
(one thread unless --threads) the original layer and the svd / tucker2 / cp
structures at ranks r-8, r-3 ... r+3, r+8 around r = C/4 and C/2 (multiples of 16),
then every method at C/8, C/4, C/2 against the original. Prints three tables:

0. a single conv's latency against its channel count (the step that rank multiples avoid);
1. latency at each rank relative to the latency at r (1.00 = as fast as the aligned rank);
2. per method and rank fraction: FLOP ratio, latency ratio, efficiency = FLOP ratio / latency ratio
   (1.0: latency follows FLOPs; below 1: slower than FLOPs promise; latency ratio > 1: slower than the layer);
3. every method on a grid of eighths of its maximum ranks: from which FLOP ratio it is slower than the layer.

Usage::

    python tools/study_rank_multiples.py                 # about 4 minutes on an idle core
    python tools/study_rank_multiples.py --quick         # two shapes, fewer ranks
    python tools/study_rank_multiples.py --threads 2 --cache-dir ~/.cache/fxdecomp
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxdecomp.cost import module_macs, spec_macs  # noqa: E402
from fxdecomp.decomposers import get_decomposer  # noqa: E402
from fxdecomp.onnxrt import LayerLatency, cpu_model, preferred_rank_multiple  # noqa: E402
from fxdecomp.layer_spec import layer_spec  # noqa: E402

SHAPES = [(64, 224), (128, 112), (256, 56), (512, 28)]  # VGG-16's 3x3 convs: 1.85 GMAC each
OFFSETS = (-8, -3, -2, -1, 0, 1, 2, 3, 8)
SWEEP_METHODS = ("svd", "tucker2", "cp")
ALL_METHODS = ("svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd")
FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def square_convs(shapes):
    """(channels, spec, input shape) of a 3x3 'same' conv C -> C for each (C, size) in ``shapes``."""
    for channels, size in shapes:
        yield channels, layer_spec(nn.Conv2d(channels, channels, 3, padding=1)), (1, channels, size, size)


def ranks_for(method: str, r: int) -> tuple[int, ...]:
    """Ranks of ``method`` for a C->C 3x3 conv at 'rank r' (every bond r; tiled: r/2 per tile of 2x2)."""
    return {"tucker2": (r, r), "tt": (r, r, r), "tiled_svd": (max(1, r // 2),) * 4}.get(method, (r,))


def options_for(method: str) -> dict:
    return {"tiles": (2, 2)} if method == "tiled_svd" else {}


def flop_ratio(spec, shape, method, ranks) -> float:
    with torch.device("meta"):
        module = get_decomposer(spec.kind, method, **options_for(method)).structure(spec, ranks)
    return module_macs(module, shape) / spec_macs(spec, shape)


def channel_granularity(timer: LayerLatency, quick: bool) -> None:
    """Dense 3x3 conv 128 -> c and depthwise 3x1 conv on c channels, c around 128, at 56x56."""
    print("## 0. Channel granularity: latency against the channel count c (56x56 input)")
    print("| c | c mod 16 | Conv 3x3 128->c ms | rel. to c=128 | FLOPs rel. | depthwise 3x1 on c ms | rel. to c=128 |")
    print("|---|---|---|---|---|---|---|")
    counts = range(112, 146, 4 if quick else 2)
    dense = {c: timer.layer_ms(layer_spec(nn.Conv2d(128, c, 3, padding=1)), (1, 128, 56, 56)) for c in counts}
    depthwise = {c: timer.layer_ms(layer_spec(nn.Conv2d(c, c, (3, 1), padding=(1, 0), groups=c)), (1, c, 56, 56)) for c in counts}
    for c in counts:
        print(
            f"| {c} | {c % 16} | {dense[c]:.3f} | {dense[c] / dense[128]:.2f} | {c / 128:.2f} | "
            f"{depthwise[c]:.3f} | {depthwise[c] / depthwise[128]:.2f} |"
        )
    print()


def break_even(timer: LayerLatency, shapes) -> None:
    """Every method on a grid of fractions of its maximum ranks (rounded to 16): where is it slower than the layer?"""
    print("\n## 3. Where each method stops paying: FLOP ratio / latency ratio on a grid of its maximum ranks")
    print(
        "| layer | method | FLOP ratio / latency ratio at 1/8, 2/8, ... of the maximum ranks, rounded up to 16 "
        "(FLOP ratio < 1 only) | slower than the layer from FLOP ratio |"
    )
    print("|---|---|---|---|")
    for channels, spec, shape in square_convs(shapes):
        original = timer.layer_ms(spec, shape)
        for method in ALL_METHODS:
            decomposer = get_decomposer(spec.kind, method, **options_for(method))
            maxima = decomposer.max_ranks(spec)
            cells, slower_from, seen = [], None, set()
            for eighth in range(1, 9):
                ranks = tuple(min(m, 16 * math.ceil(m * eighth / 8 / 16)) for m in maxima)
                if ranks in seen:
                    continue
                seen.add(ranks)
                flops = flop_ratio(spec, shape, method, ranks)
                if flops >= 1.0:
                    break
                latency = timer.layer_ms(spec, shape, method, ranks, options_for(method)) / original
                cells.append(f"{flops:.2f}/{latency:.2f}")
                if latency >= 1.0 and slower_from is None:
                    slower_from = flops
            slower = "-" if slower_from is None else f"{slower_from:.2f}"
            print(f"| {channels}->{channels} @{shape[-1]} | {method} | {' '.join(cells)} | {slower} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two shapes, C/4 only")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--statistic", default="min", choices=["median", "p10", "min"],
        help="per-layer statistic; min (default) is the steadiest on a machine shared with other jobs",
    )
    parser.add_argument("--cache-dir", default=None, help="reuse/keep timings here (default: measure afresh, keep nothing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    timer = LayerLatency(
        threads=args.threads, cache_dir=args.cache_dir, runs=args.runs, warmup=3, min_seconds=0.3,
        persist=args.cache_dir is not None, statistic=args.statistic,
    )
    shapes = SHAPES[1:3] if args.quick else SHAPES
    bases = (4,) if args.quick else (4, 2)
    start = time.perf_counter()
    print(
        f"CPU: {cpu_model()}; threads={args.threads}; statistic={args.statistic}; "
        f"preferred_rank_multiple()={preferred_rank_multiple(args.threads)}\n"
    )
    channel_granularity(timer, args.quick)

    print("## 1. Latency at rank r+d relative to rank r (r = C/4, C/2; multiples of 16); ms at r in brackets")
    header = "| layer | method | r | " + " | ".join(f"{d:+d}" for d in OFFSETS) + " |"
    print(header)
    print("|" + "---|" * (3 + len(OFFSETS)))
    penalties: dict[str, list[float]] = {"+1..+3": [], "-3..-1": [], "+-8": []}
    for channels, spec, shape in square_convs(shapes):
        for base in bases:
            r = channels // base
            for method in SWEEP_METHODS:
                times = {d: timer.layer_ms(spec, shape, method, ranks_for(method, r + d)) for d in OFFSETS}
                rel = {d: times[d] / times[0] for d in OFFSETS}
                penalties["+1..+3"] += [rel[d] for d in (1, 2, 3)]
                penalties["-3..-1"] += [rel[d] for d in (-3, -2, -1)]
                penalties["+-8"] += [rel[d] for d in (-8, 8)]
                cells = " | ".join(f"{rel[d]:.2f}" if d else f"1.00 ({times[0]:.2f})" for d in OFFSETS)
                print(f"| {channels}->{channels} @{shape[-1]} | {method} | {r} | {cells} |")
    print()
    for name, values in penalties.items():
        values = sorted(values)
        print(f"offset {name}: median {values[len(values) // 2]:.2f}x, range {values[0]:.2f}-{values[-1]:.2f}x the aligned rank's latency")

    print("\n## 2. Every method at ranks C/8, C/4, C/2 against the original layer")
    print("| layer | original ms | method | rank | FLOP ratio | latency ratio | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for channels, spec, shape in square_convs(shapes):
        original = timer.layer_ms(spec, shape)
        for method in ALL_METHODS:
            for fraction in FRACTIONS:
                ranks = ranks_for(method, int(channels * fraction))
                ms = timer.layer_ms(spec, shape, method, ranks, options_for(method))
                flops = flop_ratio(spec, shape, method, ranks)
                slower = " **slower**" if ms > original else ""
                print(
                    f"| {channels}->{channels} @{shape[-1]} | {original:.2f} | {method} | {ranks} | {flops:.3f} | "
                    f"{ms / original:.3f}{slower} | {flops / (ms / original):.2f} |"
                )
    break_even(timer, shapes)
    print(f"\n{timer.measurements} layers timed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
