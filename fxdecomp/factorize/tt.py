"""Tensor-train SVD (Oseledets 2011) with the Gram-eigh truncation of `svd.py`.

Example::

    cores = tt_svd(tensor, ranks=(4, 8))   # tensor of order 3 -> 3 cores
    tt_reconstruct(cores)                  # ~ tensor

Cores have shape (r_{k-1}, n_k, r_k) with r_0 = r_d = 1. The error of TT-SVD is
bounded by sqrt(sum_k eps_k^2), eps_k the best-rank-r_k error of the k-th
unfolding of the tensor (Oseledets, Thm 2.2); `tt_error_bound` returns that
bound without running the decomposition. Written with the helpers of `svd.py`
rather than tensorly's ``tensor_train`` so that every truncation shares the
fast, steady eigh route.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .svd import Spectrum, low_rank_factors, matrix_spectrum


def tt_max_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1))


def unfolding_spectra(tensor: torch.Tensor) -> list[Spectrum]:
    shape = tensor.shape
    return [matrix_spectrum(tensor.reshape(math.prod(shape[: k + 1]), -1)) for k in range(len(shape) - 1)]


def tt_error_bound(spectra: Sequence[Spectrum], ranks: Sequence[int]) -> float:
    return math.sqrt(sum(s.relative_error(r) ** 2 for s, r in zip(spectra, ranks)))


def tt_svd(
    tensor: torch.Tensor, ranks: Sequence[int], first_weight: tuple[torch.Tensor, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """TT cores (r_{k-1}, n_k, r_k) of ``tensor`` at ``ranks``, left to right.

    ``first_weight`` = (A^(1/2), A^(-1/2)) of a positive definite A on the first mode weights the
    first truncation: the first core spans the leading left singular vectors of A^(1/2) T_(1)
    (mapped back by A^(-1/2)), the best rank-r_1 fit in the A-norm (A: the input channels' Gram matrix).
    """
    shape = tensor.shape
    cores = []
    rest = tensor.detach().to(torch.float64)
    previous = 1
    for k, rank in enumerate(ranks):
        matrix = rest.reshape(previous * shape[k], -1)
        if k == 0 and first_weight is not None:
            root, inverse_root = (w.to(torch.float64) for w in first_weight)
            basis, rest = low_rank_factors(root @ matrix, rank)
            left = inverse_root @ basis
        else:
            left, rest = low_rank_factors(matrix, rank)
        # A bond wider than the unfolding allows (after a narrow previous bond) gets zero padding,
        # so every core has exactly the requested shape.
        missing = rank - left.shape[1]
        left = torch.nn.functional.pad(left, (0, missing))
        rest = torch.nn.functional.pad(rest, (0, 0, 0, missing))
        cores.append(left.reshape(previous, shape[k], rank))
        previous = rank
    cores.append(rest.reshape(previous, shape[-1], 1))
    return cores


def tt_reconstruct(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    result = cores[0]
    for core in cores[1:]:
        result = torch.tensordot(result, core, dims=([-1], [0]))
    return result.squeeze(0).squeeze(-1)
