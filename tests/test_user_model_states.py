"""Models in the states users hand them over in: hooks registered, frozen layers, inference mode, wrapped in
DataParallel, channels_last, a weight also read by a functional call. Each state must come out computing what the
user's model computes (or refused by name), with the user's model untouched.

Found by probing fxdecomp with models in these states (2026-12-01); each test fails on the code before its fix.
"""

import dataclasses
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.kept_layer import KeptLayer

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
FULL_RANK = {"conv1": ("svd", (16,)), "conv2": ("svd", (32,)), "fc1": ("svd", (64,)), "fc2": ("svd", (10,))}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- hooks ------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook"])
def test_a_layer_with_a_hook_of_the_users_is_kept_so_its_hook_still_runs(frontend, kind):
    model = net()
    if kind == "forward hook":
        handle = model.fc1.register_forward_hook(lambda module, args, output: output * 2)
    else:
        handle = model.fc1.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with torch.no_grad():
        expected = model(X)
    with pytest.warns(UserWarning, match=r"fc1 \(" + kind):
        result = fxdecomp.compress(model, (X,), plan=FULL_RANK, frontend=frontend)
    decisions = {d.name: d for d in result.decisions}
    assert (decisions["fc1"].method, decisions["fc1"].reason) == ("keep", "hooks")  # though the plan names it
    assert decisions["conv2"].method == "svd"  # the others are decomposed as planned
    with torch.no_grad():
        assert relative_error(result.graph_module(X), expected) < 1e-5
        assert relative_error(result.apply_to(model, example_inputs=(X,))(X), expected) < 1e-5
    assert list(model.fc1._forward_hooks.values()) + list(model.fc1._forward_pre_hooks.values())  # the user's, untouched
    handle.remove()


def test_hooks_on_the_model_itself_are_captured_with_it():
    model = net()
    model.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    model.register_forward_hook(lambda module, args, output: output + 1)
    with torch.no_grad():
        expected = model(X)
    result = fxdecomp.compress(model, (X,), plan=FULL_RANK)
    assert result.frontend == "export"  # torch.fx traces forward, without the hooks around it
    assert all(d.method == "svd" for d in result.decisions)
    with torch.no_grad():
        assert relative_error(result.graph_module(X), expected) < 1e-5
        assert relative_error(result.apply_to(model, example_inputs=(X,))(X), expected) < 1e-5
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == 1


@pytest.mark.parametrize("where", ["the model", "a layer"])
def test_what_an_exported_graph_loses_of_hooks_is_said_and_keep_mode_keeps_them(where):
    # torch.export records what forward hooks compute, not their Python side effects nor backward hooks; the warning
    # once claimed a layer was kept "so its hook still runs" in a graph where it could not.
    model, seen = net(), []
    hooked = model if where == "the model" else model.fc1
    hooked.register_forward_hook(lambda module, args, output: seen.append("forward"))
    hooked.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append("backward"))
    with pytest.warns(UserWarning, match="torch.export.*backward hooks do not run in it.*result.apply_to"):
        result = fxdecomp.compress(model, (X,), budget=0.6, frontend="export", pipeline="flops")
    for compressed, runs in ((result.graph_module, []), (result.apply_to(model, example_inputs=(X,)), ["forward", "backward"])):
        seen.clear()
        compressed(X.clone().requires_grad_(True)).sum().backward()
        assert seen == runs


class TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_hook_on_one_user_of_a_tied_weight_keeps_that_user_only(frontend):
    # torch.export calls a tied weight functionally from both modules; the hooks of every owner of the weight were
    # taken for each call's, so the call of the module without a hook was kept (and named) too.
    torch.manual_seed(0)
    model = TiedPair().eval()
    model.b.register_forward_hook(lambda module, args, output: output * 2)
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) carry hooks of yours.*: b \(forward hook\)"):
        result = fxdecomp.compress(model, (x,), plan={"a": ("svd", (32,)), "b": ("svd", (32,))}, frontend=frontend)
    assert {d.name: (d.method, d.reason) for d in result.decisions} == {"a": ("svd", ""), "b": ("keep", "hooks")}
    with torch.no_grad():
        assert relative_error(result.graph_module(x), expected) < 1e-5


def test_torchs_own_weight_hooks_are_not_taken_for_the_users():
    model = net()
    torch.nn.utils.prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    with torch.no_grad():
        expected = model(X)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hooks of yours")
        result = fxdecomp.compress(model, (X,), plan=FULL_RANK)
    assert {d.name: d.method for d in result.decisions}["fc1"] == "svd"
    with torch.no_grad():
        assert relative_error(result.graph_module(X), expected) < 1e-5


# ---- trainability and modes ------------------------------------------------------------------


@pytest.mark.parametrize("frozen", ["weight and bias", "weight only"])
def test_a_frozen_layers_factors_stay_frozen(frozen):
    model = net()
    model.conv2.weight.requires_grad_(False)
    if frozen == "weight and bias":
        model.conv2.bias.requires_grad_(False)
    result = fxdecomp.compress(model, (X,), plan={"conv2": ("svd", (8,))})
    bias_trains = frozen == "weight only"
    for module in (result.graph_module.conv2, result.apply_to(model, example_inputs=(X,)).conv2):
        flags = {name: p.requires_grad for name, p in module.named_parameters()}
        assert flags == {"0.weight": False, "1.weight": False, "1.bias": bias_trains}
    layer = fxdecomp.decompose_layer(model.conv2, "tucker2", "full")
    assert [p.requires_grad for n, p in layer.named_parameters() if not n.endswith("bias")] == [False] * 3
    assert layer[-1].bias.requires_grad is bias_trains
    assert model.conv2.weight.requires_grad is False and model.conv2.bias.requires_grad is bias_trains



class FunctionalNet(nn.Module):
    """Weights read by functional calls (and one through ``.T``): capture lifts each into a stand-in layer."""

    def __init__(self):
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)
        self.conv_b = nn.Parameter(torch.zeros(16))
        self.fc_w = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.fc_b = nn.Parameter(torch.zeros(32))
        self.out_w = nn.Parameter(torch.randn(16, 10) * 0.2)  # (in, out): read as x @ W

    def forward(self, x):
        x = F.conv2d(x, self.conv_w, self.conv_b, padding=1).mean((2, 3))
        return F.relu(F.linear(x, self.fc_w, self.fc_b))[:, :16] @ self.out_w


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_factors_train_as_their_weights_do_in_every_form_and_frontend(frontend):
    # The factors of a functional call or of an exported graph once came from stand-in layers built frozen: every
    # factor came back frozen, and finetune refused the result ("no trainable parameters").
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    model.fc_b.requires_grad_(False)  # a frozen bias beside a trainable weight
    x = torch.randn(2, 3, 8, 8)
    plan = {"conv_w": ("svd", (4,)), "fc_w": ("svd", (4,)), "out_w": ("svd", (4,))}
    result = fxdecomp.compress(model, (x,), plan=plan, frontend=frontend)
    decomposed = [d.name for d in result.decisions if d.decomposed]
    assert len(decomposed) == 3, result.decisions
    flags = {name: p.requires_grad for name, p in result.graph_module.named_parameters()}
    assert flags and all(trains for name, trains in flags.items() if not name.startswith("fc_w")), flags
    fc = {name: trains for name, trains in flags.items() if name.startswith("fc_w")}
    assert fc == {"fc_w_lowrank.0.weight": True, "fc_w_lowrank.1.weight": True, "fc_w_lowrank.1.bias": False}, flags
    graph = result.graph_module
    model.fc_w.requires_grad_(False)
    frozen = fxdecomp.compress(model, (x,), plan=plan, frontend=frontend).graph_module
    assert not any(p.requires_grad for name, p in frozen.named_parameters() if name.startswith("fc_w")), frozen
    assert any(p.requires_grad for p in graph.parameters())

def test_compress_under_inference_mode_calibrates_and_returns_a_trainable_model():
    model = net()
    batches = [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(s)),) for s in (2, 3)]
    outside = fxdecomp.compress(model, (X,), budget=0.5, calibration=batches, pipeline="flops")
    with torch.inference_mode():
        inference_batches = [(b[0].clone(),) for b in batches]
        inside = fxdecomp.compress(model, (X.clone(),), budget=0.5, calibration=inference_batches, pipeline="flops")
    # The same plan: output-aware calibration ran although the caller and its batches were in inference mode.
    assert [(d.name, d.method, d.ranks) for d in inside.decisions] == [(d.name, d.method, d.ranks) for d in outside.decisions]
    assert not any(p.is_inference() for p in inside.graph_module.parameters())
    inside.graph_module(X).sum().backward()  # trainable: fine-tuning it works
    assert all(p.grad is not None for p in inside.graph_module.parameters())


# ---- wrappers, layouts, weights read elsewhere ------------------------------------------------------


def test_a_dataparallel_inside_the_model_is_traced_into():
    model = nn.Sequential(nn.DataParallel(net()), nn.Softmax(-1)).eval()
    result = fxdecomp.compress(model, (X,), budget=0.5, pipeline="flops")
    assert {d.name for d in result.decisions} == {f"0.module.{n}" for n in ("conv1", "conv2", "fc1", "fc2")}
    assert result.flops_after / result.flops_before <= 0.5
    assert torch.isfinite(result.graph_module(X)).all()


def test_layers_hidden_inside_a_module_the_graph_calls_whole_are_named_in_the_warning():
    class Opaque(nn.Module):  # a torch.nn module to torch.fx, hence a leaf it does not trace into
        def __init__(self):
            super().__init__()
            self.inner = net()

        def forward(self, x):
            return self.inner(x)

    Opaque.__module__ = "torch.nn.modules.user_opaque"
    with pytest.warns(UserWarning, match=r"has 4 Conv/Linear layer\(s\) but none .* inside 'opaque'"):
        fxdecomp.compress(_Holder(Opaque()), (X,), budget=0.5, frontend="fx")


class _Doubling(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_layers_fxdecomp_refuses_are_named_with_their_reason_when_none_is_left():
    # It said they ran "where the captured graph does not show them", for a layer the graph showed and refused.
    with pytest.warns(UserWarning, match=r"has 1 Conv/Linear layer\(s\), none of which fxdecomp can decompose \(opaque: "
                                         r"_Doubling overrides forward"):
        result = fxdecomp.compress(_Holder(_Doubling(3, 8, 3)), (X,), budget=0.5)
    assert result.decisions == []


class _Holder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.opaque = module

    def forward(self, x):
        return self.opaque(x)


def test_channels_last_layers_get_channels_last_factors():
    model = net().to(memory_format=torch.channels_last)
    result = fxdecomp.compress(model, (X.to(memory_format=torch.channels_last),), plan={"conv2": ("tucker2", (8, 8))})
    for module in (result.graph_module.conv2, result.apply_to(model, example_inputs=(X,)).conv2):
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in module if isinstance(m, nn.Conv2d))


def test_a_layer_whose_weight_a_functional_call_also_reads_stays_printable_and_exports(tmp_path):
    class TiedFunctional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            y = F.relu(self.conv2(F.relu(self.conv1(x))))
            y = F.relu(F.conv2d(y, self.conv2.weight.transpose(0, 1).flip(2, 3), padding=1))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    model = TiedFunctional().eval()
    result = fxdecomp.compress(model, (X,), plan={"conv2": ("svd", (16,))})
    with torch.no_grad():
        assert relative_error(result.graph_module(X), model(X)) < 1e-5
    assert "conv2" in repr(result.graph_module)  # the Conv2d kept for its weight, its bias unused
    fxdecomp.export_onnx(result.graph_module, (X,), tmp_path / "tied.onnx")  # checks parity with onnxruntime


# ---- the command line ---------------------------------------------------------------------------


def test_the_cli_loads_a_saved_model_whose_class_is_in_the_working_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = nn.Linear(8, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
    )
    save = "import torch, mymodels; torch.save(mymodels.Tiny(), 'whole.pt')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True, env=env)
    package_parent = str(Path(fxdecomp.__file__).resolve().parents[1])
    # As the console script runs: the package importable, the working directory not on sys.path (PYTHONSAFEPATH).
    run = [sys.executable, "-c", f"import sys; sys.path.insert(0, {package_parent!r}); from fxdecomp.cli import main; sys.exit(main())",
           "inspect", "whole.pt", "--input-shape", "2,8"]
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**env, "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "fc" in proc.stdout


def test_an_exclude_pattern_that_names_no_layer_is_named_in_a_warning():
    model = nn.DataParallel(net())  # its layers are named module.conv1, ...
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['conv2'\] name no layer .*module\.conv1"):
        result = fxdecomp.compress(model, (X,), budget=0.6, exclude=["conv2", "module.fc1"], pipeline="flops")
    assert {d.name: d.reason for d in result.decisions}["module.fc1"] == "excluded"



def test_warnings_name_the_users_line_whatever_path_raised_them():
    # A fixed stacklevel named fxdecomp's own lines (grad_mode.py's wrapper, passes/base.py's runner), and Python's
    # once-per-location filter then counted every user's call as one place.
    model = net()
    model.fc1.register_forward_hook(lambda module, args, output: output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress_line = inspect.currentframe().f_lineno + 1
        result = fxdecomp.compress(model, (X,), budget=0.6, exclude=["nothing"], pipeline="flops")
        apply_line = inspect.currentframe().f_lineno + 1
        result.apply_to(model, example_inputs=(X,))
    ours = [w for w in caught if str(w.message).startswith("fxdecomp:")]
    assert all(issubclass(w.category, fxdecomp.FxDecompWarning) for w in ours)  # one category to filter them all
    assert any("exclude pattern" in str(w.message) for w in ours) and any("hook" in str(w.message) for w in ours)
    assert {(w.filename, w.lineno) for w in ours} <= {(__file__, compress_line), (__file__, apply_line)}, [
        (w.filename, w.lineno, str(w.message)[:60]) for w in ours]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def test_compress_sequential_keeps_a_hooked_layer_with_its_hook():
    # The streamed path factorized it and dropped the hook, silently.
    from fxdecomp.large import compress_sequential

    torch.manual_seed(0)
    model, calls = _Stack().eval(), []
    model.layers[1].fc1.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) carry hooks of yours .*layers\.1\.fc1 \(forward hook\)"):
        result = compress_sequential(model, (x,), budget=0.5)
    compressed = result.model
    assert "layers.1.fc1" not in {d.name for d in result.decisions}  # not planned, as an excluded layer is not
    assert type(compressed.layers[0].fc1) is KeptLayer  # the others are decomposed
    calls.clear()
    with torch.no_grad():
        compressed(x)
    assert calls == [torch.Size([8, 128])]


class _Branchy(nn.Module):
    """Not capturable whole (a data-dependent branch), so compress captures its submodules (partial capture)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        h = self.body(x)
        if h.sum().item() > -1e9:
            h = h + 1
        return self.head(h)


def test_partial_capture_keeps_a_hooked_submodule_and_captures_inside_it():
    # The hooked submodule was itself the captured part: its graph replaced it, and the hook never ran again.
    torch.manual_seed(0)
    model, seen = _Branchy().eval(), []
    model.body.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    x = torch.randn(4, 32)
    result = fxdecomp.compress(model, (x,), plan={"body.0": ("svd", (8,)), "body.2": ("svd", (8,))})
    assert {d.name: d.method for d in result.decisions if d.decomposed} == {"body.0": "svd", "body.2": "svd"}
    seen.clear()
    with torch.no_grad():
        result.graph_module(x)
    assert seen == [torch.Size([4, 32])]


# ---- models no capture can read, refused by name ------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_model_is_refused_by_name(how):
    # It reached partial capture, whose hooks raised torch's "register_forward_pre_hook is not supported on ScriptModules".
    model = torch.jit.script(net()) if how == "script" else torch.jit.trace(net(), X)
    with pytest.raises(fxdecomp.InvalidInputError, match="TorchScript module .* pass the eager nn.Module"):
        fxdecomp.compress(model, (X,), budget=0.5)


def test_a_model_on_the_meta_device_is_refused_by_name():
    # It raised torch's "Tensor.item() cannot be called on meta tensors", or blamed the (fine) example inputs.
    with torch.device("meta"):
        model = Net()
    for inputs in ((X,), (X.to("meta"),)):
        with pytest.raises(fxdecomp.InvalidInputError, match=r"on the meta device.*conv1\.weight.*load real weights"):
            fxdecomp.compress(model, inputs, budget=0.5)


# ---- keep mode's check --------------------------------------------------------------------------------------


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_apply_to_after_the_graph_module_was_set_to_train_checks_in_eval_and_changes_nothing():
    # The check ran the graph_module as it was left (train: dropout drawn, BatchNorm on batch statistics, its running
    # statistics updated by the check) and refused the correct model, blaming tied weights.
    torch.manual_seed(0)
    model = _WithBatchNorm().eval()
    result = fxdecomp.compress(model, (X,), plan={"conv": ("svd", (8,)), "fc": ("svd", (4,))})
    result.graph_module.train()
    before = {name: tensor.clone() for name, tensor in result.graph_module.state_dict().items()}
    kept = result.apply_to(model, example_inputs=(X,))
    assert result.graph_module.training and result.graph_module.bn.training
    after = result.graph_module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    with torch.no_grad():
        assert relative_error(kept(X), result.graph_module.eval()(X)) < 1e-5


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    extra: None = None


class _ReturnsDataclass(Net):
    def forward(self, x):
        return _Out(super().forward(x))


def test_apply_to_checks_a_model_that_returns_a_plain_dataclass():
    # pytree does not open an unregistered dataclass: the check compared None with None and refused.
    model = _ReturnsDataclass().eval()
    result = fxdecomp.compress(model, (X,), plan=FULL_RANK)
    kept = result.apply_to(model, example_inputs=(X,))
    with torch.no_grad():
        assert relative_error(kept(X).logits, model(X).logits) < 1e-5


# ---- what a successful compress prints --------------------------------------------------------------------------


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x, *, mask=None):
        h = self.fc1(x)
        if mask is not None:
            h = h * mask
        return self.fc2(F.relu(h))


def test_a_capture_that_falls_back_prints_no_traceback(capfd):
    # fx traces the mask branch; torch printed the failing graph's traceback to stderr before compress moved on.
    model = _OptionalMask().eval()
    x = torch.randn(4, 64)
    result = fxdecomp.compress(model, (x,), plan={"fc1": ("svd", (64,))})
    assert "Traceback" not in capfd.readouterr().err
    with torch.no_grad():
        assert relative_error(result.graph_module(x), model(x)) < 1e-5


def test_fxdecomp_large_is_reachable_from_the_package():
    code = "import fxdecomp; print(fxdecomp.large.load_compressed.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "load_compressed"


class _BufferWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(64, 64) / 8)  # a fixed projection, stored as a buffer
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(F.relu(F.linear(x, self.w)))


def test_the_factors_of_a_weight_stored_as_a_buffer_are_buffers():
    # They were frozen parameters: the parameter count rose (650 -> 2.42k) while the report's rows fell.
    torch.manual_seed(0)
    model, x = _BufferWeight().eval(), torch.randn(4, 64)
    result = fxdecomp.compress(model, (x,), plan={"w": ("svd", (64,))})
    gm = result.graph_module
    assert not [n for n, _ in gm.named_parameters() if n.startswith("w_")]
    assert {n for n, _ in gm.named_buffers() if n.startswith("w_")} == {"w_lowrank.0.weight", "w_lowrank.1.weight"}
    assert result.params_after == result.params_before == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) < 1e-5
