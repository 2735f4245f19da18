"""fxdecomp.compile (compress, then torch.compile) and the "fxdecomp" dynamo backend."""

import importlib

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.compile import compile as fx_compile
from fxdecomp.compile import compile_with_result
from fxdecomp.errors import InvalidInputError
from fxdecomp.result import CompressionResult
from tests.cli_factory import small_cnn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _x(batch=2, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_compile_with_inductor_equals_the_uncompiled_compressed_module():
    model, x = small_cnn(), _x()
    compiled = fx_compile(model, (x,), budget=0.5, methods=["svd", "tucker2"])
    result = compiled.compression
    assert isinstance(result, CompressionResult) and any(d.decomposed for d in result.decisions)
    with torch.no_grad():
        got, expected, original = compiled(x), result.graph_module(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, original, atol=1e-4)  # the compiled module is the compressed one


def test_compress_and_compile_arguments_go_where_they_belong():
    model, x = small_cnn(), _x()
    compiled, result = compile_with_result(model, (x,), 0.5, methods=["svd"], exclude=["features.0"], backend="eager")
    assert {d.method for d in result.decisions} <= {"svd", "keep"}
    assert next(d for d in result.decisions if d.name == "features.0").reason == "excluded"
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), result.graph_module(x))
    with pytest.raises(TypeError):
        fx_compile(model, (x,), 0.5, no_such_option=True)


def test_backend_compresses_like_compress_and_reuses_its_plan_on_recompiles(monkeypatch):
    model, x = small_cnn(), _x()
    direct = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd", "tucker2"])
    plans = []

    def spy(*args, plan=None, **kwargs):
        plans.append(plan)
        return fxdecomp.compress(*args, plan=plan, **kwargs)

    # by module, not attribute: fxdecomp.compile may be the function once the package exports it
    monkeypatch.setattr(importlib.import_module("fxdecomp.compile"), "compress", spy)
    options = {"budget": 0.5, "methods": ["svd", "tucker2"], "backend": "eager"}
    compiled = torch.compile(model, backend="fxdecomp", dynamic=False, options=options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), direct.graph_module(x), rtol=1e-4, atol=1e-5)
        other = _x(batch=3, seed=1)  # a new shape: dynamo recompiles, the backend re-applies the same plan
        torch.testing.assert_close(compiled(other), direct.graph_module(other), rtol=1e-4, atol=1e-5)
    assert len(plans) == 2 and plans[0] is None
    assert [(d.name, d.method, d.ranks) for d in plans[1]] == [(d.name, d.method, d.ranks) for d in direct.decisions]


def test_backend_refuses_stale_weights_training_and_unknown_options():
    model, x = small_cnn(), _x()
    compiled = torch.compile(model, backend="fxdecomp", dynamic=False, options={"budget": 0.5, "backend": "eager"})
    with torch.no_grad():
        compiled(x)
        model.classifier[1].weight.mul_(2.0)  # the factors were computed from the old weights
        with pytest.raises(InvalidInputError, match="parameter has changed"):
            compiled(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="for inference"):
        torch.compile(small_cnn(), backend="fxdecomp", options={"backend": "eager"})(x)  # grad enabled, params need grad
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="takes options"):
        torch.compile(small_cnn(), backend="fxdecomp", options={"budgett": 0.5})(x)


def test_backend_keeps_buffers_as_inputs():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
    x = _x()
    compiled = torch.compile(model, backend="fxdecomp", dynamic=False, options={"budget": 1.0, "backend": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # budget 1.0: nothing decomposed, BN still right


def test_the_backends_warnings_name_the_users_line_not_torchs():
    # dynamo calls the backend from torch's own frames, so "the caller of the outermost fxdecomp frame" was
    # torch/__init__.py, where Python's once-per-location filter also merged every compile's warnings.
    import inspect
    import warnings

    torch._dynamo.reset()
    compiled = torch.compile(small_cnn().eval(), backend="fxdecomp", dynamic=False,
                             options={"budget": 0.6, "exclude": ["nothing"], "pipeline": "flops", "backend": "eager"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        compiled(_x())
    ours = [w for w in caught if issubclass(w.category, fxdecomp.FxDecompWarning)]
    assert ours and {(w.filename, w.lineno) for w in ours} == {(__file__, line)}, [(w.filename, w.lineno) for w in ours]
