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
