"""Tests written to kill mutation-testing survivors in fxdecomp/passes/verify.py (tools/mutation/run.py verify).

The verify pass is driven directly with a minimal context, so that each branch
(no reference, latency predicted from a device table, latency timed here) is
checked against a value the test sets or recomputes itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxdecomp.latency
from fxdecomp.passes.verify import VerifyPass, output_error
from fxdecomp.records import LatencyRecord


class _Context(SimpleNamespace):
    def provide(self, name, value):
        setattr(self, name, value)


def _run(reference, candidate, x, latency):
    ctx = _Context(reference=reference, example_inputs=(x,), latency=latency)
    result = VerifyPass(ctx)(candidate)
    assert result.graph_module is candidate and result.modified is False
    return ctx.verification


def test_error_is_recomputed_and_absent_without_a_reference():
    torch.manual_seed(0)
    reference, candidate = nn.Linear(6, 5), nn.Linear(6, 5)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = float((candidate(x).double() - reference(x).double()).norm() / reference(x).double().norm())
    verification = _run(reference, candidate, x, LatencyRecord(before_ms=None))
    assert verification.output_error == pytest.approx(expected, rel=1e-9)
    assert verification.latency_after_ms is None
    assert _run(None, candidate, x, LatencyRecord(before_ms=None)).output_error is None


def test_a_device_tables_prediction_is_reported_without_timing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a predicted latency must not be timed again")

    monkeypatch.setattr(fxdecomp.latency, "model_ms", never)
    model = nn.Linear(3, 2)
    verification = _run(model, model, torch.randn(2, 3), LatencyRecord(before_ms=4.0, predicted_after_ms=2.75))
    assert verification.latency_after_ms == 2.75
    assert verification.output_error == 0.0


@pytest.mark.parametrize("provider, options", [("", {}), ("CUDAExecutionProvider", {"device_id": 1})])
def test_latency_is_timed_on_the_plans_provider_threads_and_options(monkeypatch, provider, options):
    calls = []

    def model_ms(gm, example_inputs, *, threads, provider, provider_options):
        calls.append((gm, example_inputs, threads, provider, provider_options))
        return 1.25

    monkeypatch.setattr(fxdecomp.latency, "model_ms", model_ms)
    model = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    latency = LatencyRecord(before_ms=4.0, threads=3, provider=provider, provider_options=options)
    verification = _run(model, model, x, latency)
    assert verification.latency_after_ms == 1.25
    [(gm, inputs, threads, used_provider, used_options)] = calls
    assert gm is model and inputs == (x,) and threads == 3
    assert used_provider == (provider or None)  # the empty name means onnxruntime's CPU provider
    assert used_options == options and type(used_options) is dict


def test_output_error_with_no_float_output_is_zero_and_tiny_references_do_not_divide_by_zero():
    x = torch.randn(3)
    assert output_error(lambda t: torch.arange(3), lambda t: torch.arange(3) + 5, (x,)) == 0.0
    # A zero reference: the error is the candidate's norm over the 1e-30 floor, finite and huge.
    error = output_error(lambda t: torch.zeros(3), lambda t: torch.full((3,), 1e-20), (x,))
    assert error == pytest.approx(3**0.5 * 1e-20 / 1e-30, rel=1e-6)


def test_each_model_runs_on_its_own_copy_of_the_inputs():
    x = torch.ones(4)

    def writes_into_its_input(t):
        t.add_(1.0)
        return t * 1.0

    # Both runs see the same, untouched input: the error is 0 and the caller's tensor is unchanged.
    assert output_error(writes_into_its_input, writes_into_its_input, (x,)) == 0.0
    assert torch.equal(x, torch.ones(4))
