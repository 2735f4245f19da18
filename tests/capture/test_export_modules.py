"""A torch.export graph behaves like the torch.fx graph of the same model wherever fxdecomp matches nodes.

torch.export records modules as aten ops with their eval-mode flags baked in, functions
as aten overloads, and ``W.T`` as ``aten.numpy_T``; code that matched only fx-level
nodes silently did nothing on every exported model (all transformers, every model fx
cannot trace). Each test runs one kind of matcher under both frontends.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.frontend import capture


def _capture(model, x, frontend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(model, (x,), frontend=frontend)[0]


MODE_DEPENDENT = [
    (nn.Dropout(0.5), (2, 8, 6)),
    (nn.Dropout1d(0.5), (2, 8, 6)),
    (nn.Dropout2d(0.5), (2, 8, 5, 5)),
    (nn.Dropout3d(0.5), (2, 8, 3, 3, 3)),
    (nn.AlphaDropout(0.5), (2, 8, 6)),
    (nn.FeatureAlphaDropout(0.5), (2, 8, 5, 5)),
    (nn.BatchNorm1d(8), (4, 8)),
    (nn.BatchNorm1d(8), (4, 8, 6)),
    (nn.BatchNorm2d(8), (4, 8, 5, 5)),
    (nn.BatchNorm3d(8), (4, 8, 3, 3, 3)),
    (nn.BatchNorm2d(8, affine=False), (4, 8, 5, 5)),
    (nn.BatchNorm2d(8, momentum=None), (4, 8, 5, 5)),
    (nn.BatchNorm2d(8, momentum=0.0), (4, 8, 5, 5)),  # frozen statistics: the op's 0.0 is not momentum=None
]


@pytest.mark.parametrize("layer, shape", MODE_DEPENDENT, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "x".join(map(str, v)))
def test_mode_dependent_modules_follow_train_and_keep_their_state_under_export(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), layer, nn.Identity()).eval()
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            if layer.affine:
                layer.weight.uniform_(0.5, 2)
                layer.bias.uniform_(-1, 1)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected_eval = model(x)
    for frontend in ("fx", "export"):
        gm = _capture(copy.deepcopy(model), x, frontend)  # a graph shares its module's tensors: one copy each
        eager = copy.deepcopy(model)
        assert set(gm.state_dict()) == set(model.state_dict()), frontend
        with torch.no_grad():
            torch.testing.assert_close(gm(x), expected_eval, msg=frontend)
            gm.train()
            eager.train()
            torch.manual_seed(1)
            actual = gm(x)
            torch.manual_seed(1)
            expected = eager(x)
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{frontend}: {m}")
        assert not torch.allclose(actual, expected_eval), frontend  # train mode really is another computation
        for key, value in eager.state_dict().items():  # running statistics updated as the eager module's
            torch.testing.assert_close(gm.state_dict()[key], value, msg=lambda m: f"{frontend} {key}: {m}")


class _ConvBN(nn.Module):
    """conv -> BN -> ReLU6 -> conv -> BN, plus the input: the pattern the BatchNorm-aware passes look for."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu6(self.bn1(self.conv1(x))))) + x


def _conv_bn() -> _ConvBN:
    torch.manual_seed(0)
    model = _ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):  # scales that spread: the BatchNorm prior has something to say
            bn.weight.uniform_(0.1, 3.0)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.1, 4.0)
    return model.eval()


def _compress_both(model, x, recipe, **kwargs):
    results = {}
    for frontend in ("fx", "export"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[frontend] = fxdecomp.compress(model, (x,), pipeline=recipe, frontend=frontend, **kwargs)
        results[frontend].caught = [str(w.message) for w in caught]
    return results


def _plan(result):
    return [(d.name, d.method, tuple(d.ranks)) for d in result.decisions]


def test_batchnorm_prior_plans_the_same_under_export():
    model, x = _conv_bn(), torch.randn(2, 16, 8, 8)
    recipe = fxdecomp.load_recipe("flops").with_options(calibrate={"weight_prior": "batchnorm"})
    results = _compress_both(model, x, recipe, budget=0.6)
    without = _compress_both(model, x, "flops", budget=0.6)["fx"]
    assert _plan(results["fx"]) != _plan(without)  # the priors decide this plan: found in both graphs, or not
    assert _plan(results["export"]) == _plan(results["fx"])
    assert results["export"].output_error == pytest.approx(results["fx"].output_error, rel=1e-4)


@pytest.mark.parametrize("scope", ["decomposed", "all"])
def test_batchnorm_reestimation_runs_the_same_under_export(scope):
    model, x = _conv_bn(), torch.randn(2, 16, 8, 8)
    torch.manual_seed(1)
    calibration = [(torch.randn(4, 16, 8, 8) * 2 + 0.5,) for _ in range(3)]
    recipe = fxdecomp.load_recipe("flops").with_options(reestimate_batchnorm={"enabled": True, "scope": scope})
    results = _compress_both(model, x, recipe, budget=0.7, calibration=calibration, exclude=["conv1"])
    assert _plan(results["export"]) == _plan(results["fx"])
    stats = {f: r.graph_module.meta.get("fxdecomp.batchnorm_stats") for f, r in results.items()}
    assert stats["export"].batchnorms == stats["fx"].batchnorms == (("bn1", "bn2") if scope == "all" else ("bn2",))
    for name in ("bn1.running_mean", "bn2.running_mean", "bn2.running_var"):
        torch.testing.assert_close(
            results["export"].graph_module.get_buffer(name), results["fx"].graph_module.get_buffer(name), msg=name
        )
    assert torch.equal(model.bn2.running_mean, _conv_bn().bn2.running_mean)  # the input model untouched


def test_fold_batchnorm_folds_the_same_pairs_into_exported_ops_and_keeps_the_model():
    model, x = _conv_bn(), torch.randn(2, 16, 8, 8)
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": True})
    results = _compress_both(model, x, recipe, budget=0.6)
    for frontend, result in results.items():
        assert result.graph_module.meta["fxdecomp.folded_batchnorm"] == (("conv1", "bn1"), ("conv2", "bn2")), frontend
        assert not any("not folded" in m for m in result.caught), frontend
        assert not any(isinstance(m, nn.BatchNorm2d) for m in result.graph_module.modules()), frontend
    assert _plan(results["export"]) == _plan(results["fx"])
    torch.testing.assert_close(results["export"].graph_module(x), results["fx"].graph_module(x), rtol=1e-4, atol=1e-4)
    kept = results["export"].apply_to(model, example_inputs=(x,))  # checks its outputs against the graph's
    assert isinstance(kept, _ConvBN) and isinstance(kept.bn1, nn.Identity) and isinstance(kept.bn2, nn.Identity)
    assert model.conv1.bias is None and isinstance(model.bn1, nn.BatchNorm2d)  # the input model untouched


def test_fold_batchnorm_folds_an_exported_linear_and_an_untouched_plan_keeps_the_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.2, 3.0)
        model[1].weight.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 12)
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": True})
    results = _compress_both(model, x, recipe, budget=1.0)
    for frontend, result in results.items():
        assert result.graph_module.meta["fxdecomp.folded_batchnorm"] == (("0", "1"),), frontend
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    kept = results["export"].apply_to(model, example_inputs=(x,))
    assert isinstance(kept[0], nn.Linear) and isinstance(kept[1], nn.Identity)
    torch.testing.assert_close(kept(x), model(x), rtol=1e-4, atol=1e-5)


def _random_batchnorm(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    return model.eval()


class _TiedFold(nn.Module):  # the weight has two paths; torch.export reads it through the second
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32, bias=False)
        self.aux = nn.Linear(16, 32, bias=False)
        self.aux.weight = self.fc.weight
        self.bn, self.out = nn.BatchNorm1d(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.fc(x))))


class _SharedNorm(nn.Module):  # one BatchNorm called twice: folded into the conv, its other call would lose it
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.out(self.bn(self.conv(x)) + self.bn(x))


@pytest.mark.parametrize("build, x, folded_under_fx", [
    # torch.fx folds into a copy of the called module; torch.export reads the weight through its other path
    (_TiedFold, torch.randn(6, 16), (("fc", "bn"),)),
    (_SharedNorm, torch.randn(2, 16, 8, 8), ()),
    # BatchNorm1d on a Linear's 3-D output normalises dim 1 (the sequence), not the Linear's features
    (lambda: nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(24, 8)), torch.randn(3, 5, 12), ()),
], ids=["tied-weight", "batchnorm-called-twice", "linear-3d-input"])
def test_fold_batchnorm_leaves_pairs_it_cannot_fold_and_the_kept_model_stays_right(build, x, folded_under_fx):
    model = _random_batchnorm(build())
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": True})
    results = _compress_both(model, x, recipe, budget=1.0)
    for frontend, result in results.items():
        expected = folded_under_fx if frontend == "fx" else ()
        assert result.graph_module.meta.get("fxdecomp.folded_batchnorm", ()) == expected, frontend
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(result.apply_to(model)(x), model(x), rtol=1e-4, atol=1e-5)


class _ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is read by more than the BatchNorm: folding would change y


def test_fold_batchnorm_names_what_it_cannot_fold_in_an_exported_graph():
    model, x = _ConvReadTwice().eval(), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": True})
    results = _compress_both(model, x, recipe, budget=1.0)
    for frontend, result in results.items():
        assert result.graph_module.meta.get("fxdecomp.folded_batchnorm", ()) == (), frontend
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    warned = [m for m in results["export"].caught if "not folded" in m]
    assert len(warned) == 1 and "bn" in warned[0]


def test_functional_batchnorm_on_loose_tensors_stays_an_op_and_stays_exact():
    class LooseBN(nn.Module):
        """F.batch_norm on tensors held by the model itself, beside a conv: not an nn.BatchNorm to rebuild."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, training=False)

    model, x = LooseBN().eval(), torch.randn(2, 4, 3, 3)
    gm = _capture(model, x, "export")
    assert any(n.op == "call_function" and "batch_norm" in str(n.target) for n in gm.graph.nodes)
    assert set(gm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _TransposedForms(nn.Module):
    """Functional Linear layers written with every transpose spelling: W.T, W.mT, .t(), .transpose, .permute."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(32, 16, generator=g))
        for name in ("w2", "w3", "w4", "w5"):
            setattr(self, name, nn.Parameter(torch.randn(32, 32, generator=g)))
        self.b = nn.Parameter(torch.randn(32, generator=g))

    def forward(self, x):
        x = x @ self.w1.T
        x = x @ self.w2.mT
        x = torch.matmul(x, self.w3.transpose(0, 1))
        x = torch.addmm(self.b, x, self.w4.t())
        return torch.mm(x, self.w5.permute(1, 0))


def test_every_transpose_spelling_of_a_functional_linear_is_a_candidate_under_export():
    results = _compress_both(_TransposedForms().eval(), torch.randn(4, 16), "flops", budget=0.9)
    names = {f: sorted(d.name for d in r.decisions) for f, r in results.items()}
    assert names["fx"] == names["export"] == ["w1", "w2", "w3", "w4", "w5"]


class _FrozenBatchNorm2d(nn.Module):
    """detectron2's / torchvision.ops' FrozenBatchNorm2d: buffers, F.batch_norm in eval mode whatever the mode."""

    def __init__(self, channels):
        super().__init__()
        for name, value in (("weight", torch.rand(channels) + 0.5), ("bias", torch.randn(channels)),
                            ("running_mean", torch.randn(channels)), ("running_var", torch.rand(channels) + 0.5)):
            self.register_buffer(name, value)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False)


class _FrozenWithParameters(_FrozenBatchNorm2d):
    """The same with nn.Parameter affine weights: still not a torch BatchNorm, still frozen."""

    def __init__(self, channels):
        super().__init__(channels)
        weight, bias = self.weight, self.bias
        del self.weight, self.bias
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)


class _AlwaysDropout(nn.Module):
    """Monte Carlo dropout: active in eval mode too."""

    def forward(self, x):
        return F.dropout2d(x, 0.5, training=True)


@pytest.mark.parametrize(
    "layer", [_FrozenBatchNorm2d(8), _FrozenWithParameters(8), _AlwaysDropout()],
    ids=["frozen_batchnorm", "frozen_with_parameters", "always_dropout"],
)
def test_look_alikes_of_mode_dependent_modules_keep_their_behaviour_under_export(layer):
    """Only torch's own BatchNorm classes and dropout in eval mode become modules: a frozen BatchNorm (buffers, no
    train mode) and dropout the model applies always stay ops, and compute in both modes what the model does."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), layer).eval()
    x = torch.randn(4, 8, 5, 5)
    gm = _capture(copy.deepcopy(model), x, "export")
    assert set(gm.state_dict()) == set(model.state_dict())
    for mode in ("eval", "train"):
        getattr(gm, mode)()
        getattr(model, mode)()
        with torch.no_grad():
            torch.manual_seed(3)
            actual = gm(x)
            torch.manual_seed(3)
            expected = model(x)
        torch.testing.assert_close(actual, expected, msg=mode)


class _SamePaddingConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding: a static pad module applied in its own forward."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, stride=2, bias=False)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ReflectPaddingConv(nn.Conv2d):
    def forward(self, x):  # a pad fxdecomp cannot express as the conv's own: not a candidate under fx
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias, self.stride, 0)


class _PaddedNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.head = conv, nn.Conv2d(32, 32, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)))


@pytest.mark.parametrize("conv", [
    lambda: _SamePaddingConv(16, 32),
    lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(16, 32, 3, stride=2, padding=(1, 0), padding_mode="circular"),
], ids=["static-same-padding", "reflect", "circular"])
def test_keep_the_model_mode_puts_a_conv_own_pad_before_its_decomposed_conv_under_export(conv):
    # torch.export records these as a pad op, then a conv with less padding: the decomposed conv alone in the
    # user's model lost the pad (a shape error deep inside, or silently shifted outputs).
    torch.manual_seed(0)
    model, x = _PaddedNet(conv()).eval(), torch.randn(2, 16, 10, 10)  # the pad changes the output's size
    results = _compress_both(model, x, "flops", budget=0.5)
    assert _plan(results["export"]) == _plan(results["fx"])
    assert next(d for d in results["export"].decisions if d.name == "conv").decomposed
    for frontend, result in results.items():
        kept = result.apply_to(model)
        assert isinstance(kept, _PaddedNet), frontend
        with torch.no_grad():
            torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-4, atol=1e-5)


def test_keep_the_model_mode_refuses_a_subclass_whose_forward_it_cannot_express_and_names_it():
    torch.manual_seed(0)
    model, x = _PaddedNet(_ReflectPaddingConv(16, 32, 3)).eval(), torch.randn(2, 16, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxdecomp.compress(model, (x,), budget=0.5, frontend="export", exclude=["head"])
    assert next(d for d in result.decisions if d.name == "conv").decomposed
    with pytest.raises(fxdecomp.UnsupportedLayerError, match="'conv'.*exclude=\\['conv'\\]"):
        result.apply_to(model)
