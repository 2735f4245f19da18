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


def test_tt_svd_weights_its_first_truncation_in_float64_whatever_the_weights_dtype():
    """A float32 (A^(1/2), A^(-1/2)) pair weights the float64 unfolding as the float64 pair does, and the
    first core is the A-norm optimum recomputed here: A^(-1/2) times the leading left vectors of A^(1/2) T_(1)."""
    from fxdecomp.factorize.tt import tt_svd

    torch.manual_seed(0)
    tensor = torch.randn(6, 5, 4, dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64)
    a = x.T @ x / 40 + 0.1 * torch.eye(6, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(a)
    root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
    cores64 = tt_svd(tensor, (3, 2), (root, inverse_root))
    cores32 = tt_svd(tensor, (3, 2), (root.float(), inverse_root.float()))
    for c64, c32 in zip(cores64, cores32):
        assert c32.dtype == torch.float64
        torch.testing.assert_close(c32, c64, rtol=1e-5, atol=1e-6)
    u = torch.linalg.svd(root @ tensor.reshape(6, -1), full_matrices=False).U[:, :3]
    first = cores64[0].reshape(6, 3)
    expected = inverse_root @ u  # the first core spans A^(-1/2) U_r
    torch.testing.assert_close(first @ torch.linalg.pinv(first), expected @ torch.linalg.pinv(expected), rtol=1e-8, atol=1e-8)
