"""How often tiled_svd and tt refuse random layer shapes, before and after issue 16 (side by side).

Draws random Conv2d shapes (channels 1-512, groups 1 / 2 / 4 / depthwise where they
divide, kernels 1-5) and random Linear shapes (features 1-4096), and asks each
method's decomposer whether it applies (``check``, then ``max_ranks`` and a meta
``structure``: the path a compress call takes). "Before" runs that code from another
checkout (default /work/main), "after" from this one, each in its own process, so
both columns come from the real code, not a re-implementation of its rule.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/tiling_refusals.py [--before /work/main] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

CASES = [  # (label, layer kind, method, options)
    ("tiled_svd tiles=(2,2), conv", "conv", "tiled_svd", {"tiles": (2, 2)}),
    ("tiled_svd tiles=(3,3), conv", "conv", "tiled_svd", {"tiles": (3, 3)}),
    ("tiled_svd tiles=(2,2), Linear", "linear", "tiled_svd", {"tiles": (2, 2)}),
    ("tiled_svd tiles=(4,4), Linear", "linear", "tiled_svd", {"tiles": (4, 4)}),
    ("tt, conv", "conv", "tt", {}),
    ("tt, grouped conv only", "grouped", "tt", {}),
    ("tiled_svd tiles=(2,2), grouped conv only", "grouped", "tiled_svd", {"tiles": (2, 2)}),
]


def random_shapes(samples: int, seed: int) -> dict[str, list[tuple]]:
    rng = random.Random(seed)
    convs, linears = [], []
    for _ in range(samples):
        in_ch, out_ch = rng.randint(1, 512), rng.randint(1, 512)
        choice = rng.choice(["1", "1", "1", "2", "4", "depthwise"])
        groups = in_ch if choice == "depthwise" else int(choice)
        if in_ch % groups or out_ch % groups:
            groups = 1
        if choice == "depthwise":
            out_ch = in_ch
        convs.append((in_ch, out_ch, (rng.randint(1, 5), rng.randint(1, 5)), groups))
        linears.append((rng.randint(1, 4096), rng.randint(1, 4096)))
    return {"conv": convs, "linear": linears, "grouped": [c for c in convs if c[3] > 1]}


def worker(samples: int, seed: int) -> dict[str, float]:
    """Refused fraction per case, with the fxdecomp on sys.path."""
    import torch
    from torch import nn

    from fxdecomp.decomposers import get_decomposer
    from fxdecomp.errors import FxDecompError
    from fxdecomp.layer_spec import layer_spec

    shapes = random_shapes(samples, seed)
    rates = {}
    for label, kind, method, options in CASES:
        refused = 0
        for shape in shapes[kind]:
            with torch.device("meta"):
                layer = nn.Linear(*shape) if kind == "linear" else nn.Conv2d(shape[0], shape[1], shape[2], groups=shape[3])
            spec = layer_spec(layer)
            decomposer = get_decomposer(spec.kind, method, **options)
            try:
                decomposer.check(spec)
                ranks = decomposer.max_ranks(spec)
                with torch.device("meta"):
                    decomposer.structure(spec, ranks)
            except FxDecompError:
                refused += 1
        rates[label] = (refused / len(shapes[kind]), len(shapes[kind]))
    return rates


def run_in(checkout: Path, samples: int, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    script = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import tiling_refusals as t; print(json.dumps(t.worker({samples}, {seed})))"
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="/work/main", help="checkout with the code before (default /work/main)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    after_root = Path(__file__).resolve().parent.parent
    before, after = run_in(Path(args.before), args.samples, args.seed), run_in(after_root, args.samples, args.seed)
    print(f"Refused shapes, {args.samples} random draws (seed {args.seed}); before: {args.before}, after: {after_root}\n")
    print("| case | shapes | refused before | refused after |")
    print("|---|---|---|---|")
    for label, *_ in CASES:
        (b, n), (a, _) = before[label], after[label]
        print(f"| {label} | {n} | {100 * b:.1f} % | {100 * a:.1f} % |")


if __name__ == "__main__":
    main()
