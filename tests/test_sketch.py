"""Bounded calibration state: the Nyström sketch against the dense Gram matrix it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.calibration import GramAccumulator, OutputGramAccumulator, output_whitening, whitened_spectrum
from fxdecomp.layer_spec import LinearSpec
from fxdecomp.sketch import LowRankPSD, NystromSketch

DIM = 300


def rows(count: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    return (torch.randn(count, DIM, generator=generator, dtype=torch.float64) * spectrum.sqrt()) @ basis.T


def test_exact_for_a_gram_matrix_of_rank_at_most_the_sketch():
    low = torch.zeros(DIM, dtype=torch.float64)
    low[:40] = torch.logspace(0, -3, 40, dtype=torch.float64)
    x = rows(500, low)
    sketch = NystromSketch(DIM, rank=64)
    sketch.update(x[:200])
    sketch.update(x[200:])  # streamed in two parts
    approx = sketch.matrix()
    torch.testing.assert_close(approx.dense(), x.T @ x, rtol=0, atol=1e-9 * float((x.T @ x).norm()))


def test_full_rank_keeps_the_trace_and_nears_the_best_rank_k_error():
    spectrum = torch.logspace(0, -4, DIM, dtype=torch.float64)
    x = rows(3000, spectrum)
    exact = x.T @ x
    sketch = NystromSketch(DIM, rank=64)
    sketch.update(x)
    approx = sketch.matrix()
    assert float(torch.trace(approx.dense())) == pytest.approx(float(torch.trace(exact)), rel=1e-10)
    # Tropp et al. 2017, Theorem 4.1: E ||A - A_nys||_* <= (1 + r / (k - r - 1)) ||A - [A]_r||_* for r < k - 1.
    nystrom = LowRankPSD(approx.basis, approx.values, 0.0).dense()
    energies = torch.linalg.eigvalsh(exact).flip(0)
    for r in (16, 32, 48):
        bound = (1 + r / (64 - r - 1)) * float(energies[r:].sum())
        assert float(torch.linalg.matrix_norm(nystrom - exact, "nuc")) <= bound


def test_operators_agree_with_dense_algebra():
    x = rows(800, torch.logspace(0, -2, DIM, dtype=torch.float64))
    sketch = NystromSketch(DIM, rank=32)
    sketch.update(x)
    m = sketch.matrix(scale=1 / 800, damping=0.01)
    dense = m.dense()
    w = torch.randn(7, DIM, dtype=torch.float64)
    torch.testing.assert_close(w @ m, w @ dense)
    torch.testing.assert_close(m @ w.T, dense @ w.T)
    root, inverse_root = output_whitening(m)
    torch.testing.assert_close(root @ (root @ torch.eye(DIM, dtype=torch.float64)), dense)
    torch.testing.assert_close(inverse_root @ (root @ w.T), w.T)
    values, vectors = torch.linalg.eigh(dense)
    torch.testing.assert_close(m.eigenpairs(32)[0], values.flip(0)[:32])


def test_accumulators_past_the_limit_hold_no_dense_matrix():
    spec = LinearSpec(8, DIM, False)
    x = rows(400, torch.logspace(0, -3, DIM, dtype=torch.float64))
    sketched, dense = OutputGramAccumulator(spec, max_dense_dim=100), OutputGramAccumulator(spec)
    for accumulator in (sketched, dense):
        accumulator.update(x.float())
        accumulator.end_probe()
    assert sketched.sum is None and isinstance(sketched.matrix(0), LowRankPSD)
    weight = torch.randn(DIM, 8, dtype=torch.float64)
    inputs = GramAccumulator(LinearSpec(8, DIM, False))
    inputs.update(torch.randn(64, 8))
    near = whitened_spectrum(output_whitening(sketched.matrix(0))[0] @ weight, inputs.matrix(0)).energies
    far = whitened_spectrum(output_whitening(dense.matrix(0))[0] @ weight, inputs.matrix(0)).energies
    torch.testing.assert_close(near, far, rtol=0.05, atol=1e-3 * float(far[0]))


def test_compress_with_a_sketched_head_plans_like_the_dense_one(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 400)).eval()
    batches = [(torch.randn(16, 32),) for _ in range(4)]
    raw = fxdecomp.load_recipe("default").with_options(calibrate={"shrinkage": 0.0})  # a sketch is never shrunk
    dense = fxdecomp.compress(model, (torch.randn(4, 32),), budget=0.6, calibration=batches, pipeline=raw)
    monkeypatch.setattr("fxdecomp.calibration.MAX_DENSE_DIM", 200)  # the 400-way head is now sketched
    sketched = fxdecomp.compress(model, (torch.randn(4, 32),), budget=0.6, calibration=batches, pipeline=raw)
    for a, b in zip(dense.decisions, sketched.decisions):
        assert a.name == b.name
        assert abs(a.flops_after - b.flops_after) <= 0.25 * a.flops_before
        assert b.error == pytest.approx(a.error, abs=0.05)
