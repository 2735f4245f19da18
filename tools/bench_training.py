"""Win back what decomposition costs: fine-tuning with KD, DeepTwist, factorized training from scratch.

On scikit-learn's digits (real data, offline), a VGG-style CNN (`DigitsCNN`) is
trained here, then compressed to a fraction of its FLOPs with `fxdecomp.compress`.
With the same plan, the same N optimizer steps (Adam, same batches) and the same
loss (KD from the original, alpha and T below), the table gives test accuracy of:

- the original model;
- the decomposed model, no training;
- the decomposed model fine-tuned for N steps (`finetune`, teacher = original);
- DeepTwist: the original structure trained for N steps, distorted every S_D
  steps, then `finalize()` (the decomposed GraphModule);
- the decomposed structure with fresh factors (`factorized_model`), trained
  from scratch for N steps (task loss only: there is no teacher "from scratch").

    python tools/bench_training.py                        # ~1 min on 2 cores
    python tools/bench_training.py --steps 400 --every 40 --methods svd,tucker2,spatial_svd,cp
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting starve each other when the 2 cores are shared
# with other jobs (measured here: 40x slower steps, 3 s per SVD); sleeping waits do not.
# Must be set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxdecomp  # noqa: E402
from fxdecomp.digits import DigitsCNN, accuracy, load_digits_split, train_classifier  # noqa: E402
from fxdecomp.training import DeepTwist, Distiller, factorized_model, finetune  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.3, help="fraction of the model's FLOPs to keep (default 0.3)")
    parser.add_argument("--methods", default="svd,tucker2,spatial_svd", help="comma-separated methods, or 'all' (default svd,tucker2,spatial_svd)")
    parser.add_argument("--steps", type=int, default=200, help="N: optimizer steps of each training arm (default 200)")
    parser.add_argument("--every", type=int, default=20, help="DeepTwist S_D: steps between distortions (default 20)")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of fine-tuning and DeepTwist")
    parser.add_argument("--scratch-lr", type=float, default=2e-3, help="Adam learning rate of factorized training")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KD loss")
    parser.add_argument("--train-epochs", type=int, default=10, help="epochs to train the original")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="DigitsCNN width")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def batches(split, size, seed):
    """An endless, seeded stream of shuffled batches: every arm sees the same sequence."""
    for epoch in itertools.count():
        yield from split.batches(size, shuffle=True, seed=seed + 1000 + epoch)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    methods = None if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    start = time.perf_counter()
    train, test = load_digits_split(seed=args.seed)
    example = (test.images[:8],)
    rows = []

    def row(name, model, seconds, steps="-", extra=""):
        rows.append((name, accuracy(model, test), fxdecomp.count_flops(model, example), sum(p.numel() for p in model.parameters()), steps, seconds, extra))

    tic = time.perf_counter()
    original = train_classifier(DigitsCNN(args.width), train, epochs=args.train_epochs, seed=args.seed)
    row("original", original, time.perf_counter() - tic, f"{args.train_epochs} epochs")

    tic = time.perf_counter()
    result = fxdecomp.compress(original, example, budget=args.budget, methods=methods)
    row("decomposed, no training", result.graph_module, time.perf_counter() - tic, "0", "compress")
    plan = result.decisions

    tic = time.perf_counter()
    student = copy.deepcopy(result.graph_module)
    data = list(itertools.islice(batches(train, args.batch_size, args.seed), args.steps))
    history = finetune(student, data, epochs=1, lr=args.lr, teacher=original, temperature=args.temperature, alpha=args.alpha, progress=False)
    row("fine-tuned (KD)", student, time.perf_counter() - tic, str(history.steps))

    tic = time.perf_counter()
    twisted = copy.deepcopy(original).train()
    twist = DeepTwist(twisted, plan, example, every=args.every)
    objective = Distiller(twisted, original, args.temperature, args.alpha)
    optimizer = torch.optim.Adam(twisted.parameters(), lr=args.lr)
    for images, labels in data:
        optimizer.zero_grad()
        objective(images, labels)[0].backward()
        optimizer.step()
        twist.step()
    final = twist.finalize()
    row("DeepTwist (KD) + finalize", final, time.perf_counter() - tic, str(twist.steps), f"S_D={args.every}, {twist.distortions} distortions incl. finalize")

    tic = time.perf_counter()
    scratch = factorized_model(original, example, plan=plan, seed=args.seed)
    finetune(scratch, data, epochs=1, lr=args.scratch_lr, loss_fn=F.cross_entropy, progress=False)
    row("factorized, from scratch", scratch, time.perf_counter() - tic, str(args.steps), "task loss only")

    print(f"DigitsCNN(width={args.width}) on scikit-learn digits: {len(train.labels)} train / {len(test.labels)} test images; "
          f"budget {args.budget} of FLOPs, methods {args.methods}; N = {args.steps} steps of batch {args.batch_size}, "
          f"Adam lr {args.lr} (scratch {args.scratch_lr}), KD T={args.temperature} alpha={args.alpha}; "
          f"torch threads {args.threads}, seed {args.seed}. FLOPs = 2 x multiply-adds, batch {example[0].shape[0]}. "
          f"One test image = {100 / len(test.labels):.2f} points.")
    print()
    print("| plan | " + " | ".join(f"{d.name}: {d.method} {list(d.ranks)}" if d.decomposed else f"{d.name}: keep" for d in plan) + " |")
    print()
    print("| model | test accuracy | vs original (points) | FLOPs | params | training | seconds | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    base = rows[0][1]
    for name, acc, flops, params, steps, seconds, extra in rows:
        print(f"| {name} | {acc:.2%} | {100 * (acc - base):+.2f} | {flops / 1e6:.2f}M | {params / 1e3:.1f}k | {steps} | {seconds:.1f} | {extra} |")
    print()
    deltas = {name: 100 * (acc - base) for name, acc, *_ in rows[2:4]}
    met = all(delta >= -1.0 for delta in deltas.values())
    print(f"target (fine-tuning and DeepTwist within 1.0 point of the original): {'met' if met else 'NOT met'} "
          f"({'; '.join(f'{n}: {d:+.2f} points' for n, d in deltas.items())})")
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
