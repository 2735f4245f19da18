"""Per method, on VGG-16-sized 3x3 conv layers: seconds, and relative reconstruction error at rank fractions.

For each layer (64 to 512 channels, 3x3), each method runs `fxdecomp.decompose_layer`
at rank fractions 0.25 and 0.5 of its maximum ranks (CP: of min(T, S), since its
maximum rank is S*kh*kw), timing the factorisation + build, and reports the relative
reconstruction error ||W - W_hat|| / ||W|| of the weight. Beside the fast CP, tensorly's
plain `parafac` (init='svd', 100 iterations) runs on the same kernel and rank.

Kernels are trained-like: power-law spectra on both channel modes (tools/zoo.py),
because fresh Gaussian kernels have flat spectra no trained layer has.

    python tools/bench_decompose.py                              # all layers, parafac up to 256 channels
    python tools/bench_decompose.py --channels 512 --parafac-max 512 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: steadier on 2 loaded cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxdecomp  # noqa: E402
from fxdecomp.decomposers import get_decomposer  # noqa: E402
from fxdecomp.layer_spec import layer_spec  # noqa: E402
from tools.zoo import spectral_kernel  # noqa: E402

METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]


def layer(channels_in: int, channels_out: int, seed: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
    kernel = spectral_kernel((channels_out, channels_in, 3, 3), 0.7, np.random.default_rng(seed))
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel))
    return conv


def weight_error(conv: nn.Conv2d, method: str, ranks: tuple[int, ...]) -> float:
    spec, decomposer = layer_spec(conv), get_decomposer("conv2d", method)
    state = decomposer.factorize(spec, conv.weight.detach())
    dense = decomposer.reconstruct(spec, state, ranks)
    w = conv.weight.detach().double()
    return float((dense - w).norm() / w.norm())


def parafac_run(kernel: torch.Tensor, rank: int) -> tuple[float, float]:
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly warns that the 3x3 modes are smaller than the rank
        cp = parafac(kernel.double(), rank, n_iter_max=100, init="svd", random_state=0)
    seconds = time.perf_counter() - start
    approx = tl.cp_to_tensor(cp)
    tl.set_backend("numpy")
    return seconds, float((approx - kernel.double()).norm() / kernel.double().norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="64,128,256,512", help="square layers C -> C, comma-separated")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--parafac-max", type=int, default=256, help="largest C to run tensorly parafac on (512: minutes)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads; error = ||W - W_hat||_F / ||W||_F; seconds = factorise + build")
    print(f"{'layer':>12} {'method':>11} {'fraction':>8} {'ranks':>16} {'seconds':>8} {'rel. error':>10}")
    for c in (int(c) for c in args.channels.split(",")):
        conv = layer(c, c, seed=c)
        for method in args.methods.split(","):
            for fraction in fractions:
                spec = layer_spec(conv)
                decomposer = get_decomposer("conv2d", method)
                if method == "cp":
                    ranks = (max(1, round(fraction * c)),)
                else:
                    ranks = tuple(max(1, int(np.ceil(fraction * m))) for m in decomposer.max_ranks(spec))
                start = time.perf_counter()
                fxdecomp.decompose_layer(conv, method, ranks)
                seconds = time.perf_counter() - start
                error = weight_error(conv, method, ranks)
                print(f"{f'{c}x{c}x3x3':>12} {method:>11} {fraction:8.2f} {str(ranks):>16} {seconds:8.2f} {error:10.4f}", flush=True)
                if method == "cp" and c <= args.parafac_max:
                    pf_seconds, pf_error = parafac_run(conv.weight.detach(), ranks[0])
                    print(f"{'':>12} {'parafac':>11} {fraction:8.2f} {str(ranks):>16} {pf_seconds:8.2f} {pf_error:10.4f}", flush=True)


if __name__ == "__main__":
    main()
