"""Benchmark fxdecomp's cp_conv_kernel against tensorly's parafac on conv-shaped kernels.

For every size N in --sizes and rank fraction f in --fractions (rank = f * N), on an
N x N x 3 x 3 Gaussian kernel and a "trained-like" one (decaying spectrum plus a CP part
plus noise, all seeded), prints the seconds and relative error of
``tensorly.decomposition.parafac(init='svd', n_iter_max=100)`` next to ``cp_conv_kernel``
with its defaults.

    python tools/bench_cp.py --sizes 256 512 --threads 2
    python tools/bench_cp.py --sizes 512 --fractions 0.5 --skip-parafac
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fxdecomp.examples.kernels import trained_like  # noqa: E402  (the trained-like kernel the tests use)
from fxdecomp.factorize.cp import cp_conv_kernel  # noqa: E402


def gaussian_kernel(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, n, 3, 3, generator=torch.Generator().manual_seed(seed))


def relative_error(kernel: torch.Tensor, approx: torch.Tensor) -> float:
    k = kernel.double()
    return float((k - approx.double()).norm() / k.norm())


def run_parafac(kernel: torch.Tensor, rank: int, backend: str, seed: int) -> tuple[float, float]:
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend(backend)
    data = kernel if backend == "pytorch" else kernel.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_eigenvecs larger than min(matrix.shape)" on 3x3 modes
        start = time.perf_counter()
        cp = parafac(tl.tensor(data), rank, n_iter_max=100, init="svd", random_state=seed)
        seconds = time.perf_counter() - start
    approx = torch.as_tensor(tl.to_numpy(tl.cp_to_tensor(cp)))
    return seconds, relative_error(kernel, approx)


def run_ours(kernel: torch.Tensor, rank: int, seed: int, repeats: int) -> tuple[float, float]:
    times, err = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        cp = cp_conv_kernel(kernel, rank, seed=seed)
        times.append(time.perf_counter() - start)
        err = cp.relative_error
    return statistics.median(times), err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="N of the N x N x 3 x 3 kernels")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="rank = fraction * N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--kinds", nargs="+", choices=["random", "trained"], default=["random", "trained"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the kernels and of both methods")
    parser.add_argument("--repeats", type=int, default=3, help="runs of cp_conv_kernel; the median time is shown")
    parser.add_argument(
        "--parafac-backend",
        choices=["pytorch", "numpy"],
        default="pytorch",
        help="tensorly backend (pytorch is ~2x faster than numpy on 2 cores)",
    )
    parser.add_argument("--skip-parafac", action="store_true", help="time cp_conv_kernel only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, parafac backend {args.parafac_backend}")
    header = (
        f"{'kernel':>15} {'kind':>8} {'rank':>5} | {'parafac s':>9} {'parafac err':>11} | "
        f"{'ours s':>7} {'ours err':>9} | {'speedup':>7} {'err diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for fraction in args.fractions:
            rank = max(1, int(round(fraction * n)))
            for kind in args.kinds:
                kernel = gaussian_kernel(n, args.seed) if kind == "random" else trained_like(n, n, 3, 3, args.seed)
                ours_s, ours_err = run_ours(kernel, rank, args.seed, args.repeats)
                if args.skip_parafac:
                    pf = "{:>9} {:>11} |".format("-", "-")
                    tail = "{:>7} {:>9}".format("-", "-")
                else:
                    pf_s, pf_err = run_parafac(kernel, rank, args.parafac_backend, args.seed)
                    pf = f"{pf_s:9.2f} {pf_err:11.5f} |"
                    tail = f"{pf_s / ours_s:6.1f}x {ours_err - pf_err:+9.5f}"
                print(
                    f"{f'{n}x{n}x3x3':>15} {kind:>8} {rank:5d} | {pf} {ours_s:7.2f} {ours_err:9.5f} | {tail}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
