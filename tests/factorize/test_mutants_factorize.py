"""Tests written to kill mutation-testing survivors in fxdecomp/factorize/ (tools/mutation/run.py factorize).

Oracles: torch.linalg.svd of the same matrix, and the definitions in the docstrings.
"""

from __future__ import annotations

import pytest
import torch

from fxdecomp.factorize.svd import low_rank_factors, matrix_spectrum


@pytest.mark.parametrize("shape", [(3, 5), (6, 2)])
def test_a_zero_matrix_keeps_rank_one_and_has_no_error(shape):
    spectrum = matrix_spectrum(torch.zeros(shape))
    assert spectrum.total == 0.0
    for fraction in (0.1, 0.5, 1.0):
        assert spectrum.energy_rank(fraction) == 1  # "at least 1"
    assert spectrum.relative_error(0) == 0.0


@pytest.mark.parametrize("shape", [(7, 4), (4, 9)])
def test_energy_rank_and_error_follow_the_singular_values(shape):
    torch.manual_seed(sum(shape))
    matrix = torch.randn(shape, dtype=torch.float64)
    s = torch.linalg.svdvals(matrix)
    spectrum = matrix_spectrum(matrix)
    assert torch.allclose(spectrum.singular_values, s, rtol=1e-9)
    energy = s**2 / (s**2).sum()
    for rank in range(len(s) + 1):
        assert spectrum.relative_error(rank) == pytest.approx(float(energy[rank:].sum()) ** 0.5, rel=1e-9, abs=1e-12)
        if rank:
            kept = float(energy[:rank].sum())
            assert spectrum.energy_rank(kept) == rank  # exactly that fraction is kept at this rank, not before
            assert spectrum.energy_rank(kept + 1e-6) == min(rank + 1, len(s))
        left, right = low_rank_factors(matrix, rank, spectrum)
        assert left.shape == (shape[0], rank) and right.shape == (rank, shape[1])
        error = float(torch.linalg.matrix_norm(matrix - left @ right) / torch.linalg.matrix_norm(matrix))
        assert error == pytest.approx(spectrum.relative_error(rank), rel=1e-6, abs=1e-9)


def _near_cp_kernel(t, s, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, rank, generator=g) for n in (t, s, 3, 3))
    return torch.einsum("tr,sr,hr,wr->tshw", a, b, c, d) + noise * torch.randn(t, s, 3, 3, generator=g)


def test_cp_with_lossy_channel_compression_is_polished_to_the_uncompressed_fit(monkeypatch):
    # The channel compression (to 1.5 x rank directions) and the polishing sweeps on the full kernel normally
    # start at 2^29 multiply-adds per sweep; lowered here so that a small kernel takes that path.
    import fxdecomp.factorize.cp as cp

    kernel = _near_cp_kernel(12, 10, 3, 0.05, seed=0)
    plain = cp.cp_conv_kernel(kernel, 3, max_iter=3)
    monkeypatch.setattr(cp, "_LOSSY_WORK", 0)
    compressed = cp.cp_conv_kernel(kernel, 3, max_iter=3)
    recon = torch.einsum("tr,sr,hr,wr->tshw", compressed.out, compressed.inp, compressed.vertical, compressed.horizontal)
    recomputed = float((kernel - recon).norm() / kernel.norm())
    assert compressed.relative_error == pytest.approx(recomputed, rel=1e-4)
    # 5 of 12 output and 5 of 10 input directions hold nearly all of a rank-3 kernel's energy.
    assert recomputed <= 1.05 * plain.relative_error
