"""Time each pass of `fxdecomp.compress` and the whole call, on VGG-16 and ResNet-50 at 224x224.

Weights come from tools/zoo.py (torchvision's layer definitions, seeded random
weights with power-law spectra). Threads are pinned; the figures are wall seconds.

    python tools/bench_pipeline.py                         # VGG-16 and ResNet-50, budget 0.5, default recipe
    python tools/bench_pipeline.py --models vgg16 --recipe fast --threads 2
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: steadier on 2 loaded cores
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxdecomp  # noqa: E402
from tools.zoo import build  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--methods", default=None, help="comma-separated; default: the recipe's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else None
    results = {}
    for name in args.models.split(","):
        model, x = build(name), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fxdecomp.compress(model, (x,), budget=args.budget, methods=methods, pipeline=args.recipe)
        results[name] = (result, time.perf_counter() - start)
    passes = list(dict.fromkeys(p for result, _ in results.values() for p in result.pass_seconds))
    print(f"budget {args.budget}, recipe {args.recipe!r}, methods {methods or 'recipe default'}, {args.threads} threads; seconds")
    print(f"{'pass':18}" + "".join(f"{name:>12}" for name in results))
    for p in ["capture"] + passes:
        cells = []
        for result, total in results.values():
            value = total - sum(result.pass_seconds.values()) if p == "capture" else result.pass_seconds.get(p, 0.0)
            cells.append(f"{value:12.2f}")
        print(f"{p if p != 'capture' else 'capture + count':18}" + "".join(cells))
    print(f"{'whole compress':18}" + "".join(f"{total:12.2f}" for _, total in results.values()))
    print(f"{'FLOPs kept':18}" + "".join(f"{r.flops_ratio:12.3f}" for r, _ in results.values()))
    print(f"{'output rel. error':18}" + "".join(f"{r.output_error:12.3f}" for r, _ in results.values()))
    for name, (result, _) in results.items():
        methods_used = {}
        for d in result.decisions:
            methods_used[d.method] = methods_used.get(d.method, 0) + 1
        print(f"{name}: {methods_used}")


if __name__ == "__main__":
    main()
