"""Tests written to kill mutation-testing survivors in fxdecomp/vbmf.py (tools/mutation/run.py vbmf).

Oracles: the EVB free energy and threshold written from the papers in
tests/test_vbmf.py, minimised here on a dense grid; scale equivariance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fxdecomp.vbmf import evbmf, evbmf_singular_values

from .test_vbmf import evb_threshold, free_energy_reference, synthetic, tau_bar_reference


@pytest.mark.parametrize("shape, spectrum", [((3, 3), [10.0, 0.5, 0.4]), ((2, 7), [6.0, 0.7]), ((3, 4), [8.0, 1.0, 0.6])])
def test_sigma2_of_small_matrices_with_one_free_component_minimises_the_free_energy(shape, spectrum):
    # H_bar = ceil(L M / (L + M)) - 1 = 1 here: sigma2 is searched between the bounds of [2], not set to the upper one.
    s = np.array(spectrum)
    small, large = min(shape), max(shape)
    alpha = small / large
    tau = tau_bar_reference(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h_bar = math.ceil(small * large / (small + large)) - 1
    assert h_bar == 1
    upper = float(np.sum(s**2)) / (small * large)
    lower = max(s[h_bar] ** 2 / (large * x_bar), float(np.sum(s[h_bar:] ** 2)) / (large * (small - h_bar)))
    grid = np.exp(np.linspace(math.log(lower), math.log(upper), 4001))
    energies = np.array([free_energy_reference(g, s, *shape) for g in grid])
    best = grid[int(np.argmin(energies))]
    assert best < 0.9 * upper  # the minimum is inside: returning the upper bound would be wrong
    result = evbmf_singular_values(s, shape)
    assert result.sigma2 == pytest.approx(best, rel=2e-3)
    assert result.threshold == pytest.approx(evb_threshold(result.sigma2, *shape), rel=1e-9)


@pytest.mark.parametrize("c", [1e-200, 1e200])
def test_extreme_scales_give_the_same_rank_and_a_scaled_threshold(c):
    # s^2 under- or overflows double at these scales; EVBMF is scale-equivariant, so the answer must not care.
    y = synthetic(40, 120, 6, 1.0, seed=5, low=0.9, high=3.0)
    s = np.linalg.svd(y, compute_uv=False)
    base = evbmf_singular_values(s, y.shape)
    scaled = evbmf_singular_values(s * c, y.shape)
    assert base.rank >= 2
    assert scaled.rank == base.rank
    assert scaled.threshold == pytest.approx(c * base.threshold, rel=1e-6)
    assert np.allclose(np.array(scaled.singular_values) / c, np.array(base.singular_values), rtol=1e-9)
    matrix = evbmf(y * c)
    assert matrix.rank == base.rank
    assert matrix.threshold == pytest.approx(c * base.threshold, rel=1e-6)
