"""Correct on the graphs users bring (issue 13, kinds 1-4 and 6).

Each test checks the value against an independent oracle (the original model's
output, FLOPs and parameters counted here by hand) and that the input model is
untouched: parameters, buffers, training flags, hooks, requires_grad.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp import Budget
from fxdecomp.errors import BudgetError, InvalidInputError
from fxdecomp.examples.graphs import AttentionNet, Holder, SideEffect, TiedLM
from tests.capture.test_export_modules import _SamePaddingConv as SamePaddingConv

# ---- helpers: the untouched-model oracle, full-rank plans, independent counts ---------------


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "ids": [id(p) for p in model.parameters()],
        "types": [type(m) for m in model.modules()],
        "class_attributes": [sorted(a for a in vars(type(m)) if not a.startswith("__")) for m in model.modules()],  # parametrize's properties live there
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    for key in ("training", "hooks", "requires_grad", "ids", "types", "class_attributes"):
        assert after[key] == before[key], key


def compress_full_rank(model, inputs, sides):
    """Compress with every candidate at full svd rank; ``sides``: name -> (out, in) of its lowered weight."""
    plan = {name: ("svd", (min(out, cin),)) for name, (out, cin) in sides.items()}
    return fxdecomp.compress(model, inputs, plan=plan)


def relative_error(expected, actual):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def unique_params(module):
    """Elements of the module's parameters, every storage counted once (independent of fxdecomp)."""
    seen, total = set(), 0
    for p in module.parameters():
        key = (p.data_ptr(), p.shape)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


class MacCounter:
    """2 x multiply-adds of every nn.Linear / nn.Conv2d call, from forward hooks (shapes only)."""

    def __init__(self, module):
        self.flops, self.handles = 0, []
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                self.handles.append(m.register_forward_hook(self.hook))

    def hook(self, m, inputs, output):
        if isinstance(m, nn.Linear):
            self.flops += 2 * output.numel() * m.in_features
        else:
            self.flops += 2 * output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def close(self):
        for h in self.handles:
            h.remove()


def module_flops(module, inputs):
    counter = MacCounter(module)
    with torch.no_grad():
        module(*inputs)
    counter.close()
    return counter.flops


# ---- kind 1: side effects survive, verification runs on separate copies ----------------------


SIDE_SIDES = {"a": (8, 27), "b": (8, 72)}


@pytest.mark.parametrize(
    "form", ["mul_", "torch.relu_", "copy_", "index_put_", "setitem", "inplace_kwarg", "inplace_module", "buffer", "input_mul_", "wrapped"]
)
def test_side_effects_survive_and_verification_uses_separate_inputs(form):
    torch.manual_seed(0)
    model, x = SideEffect(form).eval(), torch.randn(2, 3, 8, 8)
    x_before, before = x.clone(), snapshot(model)
    result = compress_full_rank(model, (x,), SIDE_SIDES)
    assert torch.equal(x, x_before)  # the caller's inputs
    assert_untouched(model, before)
    if form == "buffer":
        assert torch.equal(result.graph_module.scale, model.scale)  # the result starts in the model's state
    with torch.no_grad():
        expected = model(x.clone())
        actual = result.graph_module(x.clone())
    assert relative_error(expected, actual) < 1e-5
    assert result.output_error < 1e-5  # and the reported error tells the truth
    if form == "buffer":
        assert float(model.scale) == float(result.graph_module.scale) == 2.0  # one run each, same state
        assert any(n.op == "call_method" and n.target == "add_" for n in result.graph_module.graph.nodes)


def test_mul_model_from_the_issue_keeps_the_in_place_node():
    torch.manual_seed(0)
    model, x = SideEffect("mul_").eval(), torch.randn(2, 3, 8, 8)
    result = compress_full_rank(model, (x,), SIDE_SIDES)
    assert any(n.op == "call_method" and n.target == "mul_" for n in result.graph_module.graph.nodes)


# ---- kind 2: several weights behind one module, every call form ----------------------------


def test_three_functional_weights_in_one_module_are_three_candidates_and_budget_half_is_reachable():
    torch.manual_seed(0)
    model, x = Holder().eval(), torch.randn(2, 5, 32)
    before = snapshot(model)
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"])
    assert_untouched(model, before)
    assert {d.name for d in result.decisions} == {"attn.wq", "attn.wk", "attn.wv"}
    flops_before = 3 * 2 * 10 * 32 * 32  # three 32x32 projections of 10 tokens, counted by hand
    assert result.flops_before == flops_before
    flops_after = module_flops(result.graph_module, (x,))  # every factor is an nn.Linear
    assert flops_after == result.flops_after <= 0.5 * flops_before
    full = compress_full_rank(model, (x,), {n: (32, 32) for n in ("attn.wq", "attn.wk", "attn.wv")})
    with torch.no_grad():
        assert relative_error(model(x), full.graph_module(x)) < 1e-5


class CallForms(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(16, 12)
        self.w = nn.Parameter(torch.randn(12, 16) / 4)
        self.b = nn.Parameter(torch.randn(12))
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x):
        f = self.form
        if f == "module_kwarg":
            return self.fc(input=x)
        if f == "linear_kwargs":
            return F.linear(input=x, weight=self.w, bias=self.b)
        if f == "addmm":
            return torch.addmm(self.b, x, self.w.t())
        if f == "matmul_t":
            return x @ self.w.t()
        if f == "torch_matmul_T":
            return torch.matmul(x, self.w.T)
        if f == "transpose":
            return torch.matmul(x, self.w.transpose(0, 1))
        if f == "module_and_functional":  # one weight, same bias: one candidate, two sites
            return self.fc(x) + F.linear(x.flip(0), self.fc.weight, self.fc.bias)
        if f == "module_and_functional_no_bias":  # same weight, another layer: two candidates
            return self.fc(x) + F.linear(x.flip(0), self.fc.weight)
        if f == "conv_kwargs":
            return F.conv2d(x, weight=self.conv.weight, bias=self.conv.bias, padding=1, stride=2)
        if f == "module_weight_read":  # the layer's own weight read by the graph: the layer must stay beside its factors
            return self.fc(x) * self.fc.weight.abs().mean() + self.fc.bias.sum()
        if f == "module_weight_read_unused":  # a read nothing uses (T5's dtype check leaves one): dropped, not dangling
            self.fc.weight
            return self.fc(x)
        raise AssertionError(f)


FORMS = {
    "module_kwarg": ({"fc": (12, 16)}, (4, 16)),
    "linear_kwargs": ({"w": (12, 16)}, (4, 16)),
    "addmm": ({"w": (12, 16)}, (4, 16)),
    "matmul_t": ({"w": (12, 16)}, (3, 4, 16)),
    "torch_matmul_T": ({"w": (12, 16)}, (3, 4, 16)),
    "transpose": ({"w": (12, 16)}, (4, 16)),
    "module_and_functional": ({"fc": (12, 16)}, (4, 16)),
    "module_and_functional_no_bias": ({"fc": (12, 16), "fc.weight": (12, 16)}, (4, 16)),
    "conv_kwargs": ({"conv": (6, 36)}, (2, 4, 9, 9)),
    "module_weight_read": ({"fc": (12, 16)}, (4, 16)),
    "module_weight_read_unused": ({"fc": (12, 16)}, (4, 16)),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_call_form_is_a_candidate_exact_at_full_rank(form):
    torch.manual_seed(0)
    sides, shape = FORMS[form]
    model, x = CallForms(form).eval(), torch.randn(*shape)
    before = snapshot(model)
    result = compress_full_rank(model, (x,), sides)
    assert_untouched(model, before)
    assert {d.name for d in result.decisions} == set(sides)
    assert all(d.decomposed for d in result.decisions)
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5
    if form == "module_and_functional":
        assert result.decisions[0].calls == 2
    children = dict(result.graph_module.named_children())
    if form == "module_weight_read":  # the read weight stays, the factors sit beside it
        assert isinstance(children["fc"], nn.Linear) and "fc_lowrank" in children
    elif form in ("module_kwarg", "module_and_functional", "module_weight_read_unused"):  # nothing else reads the layer
        assert not isinstance(children["fc"], nn.Linear) and "fc_lowrank" not in children


# ---- kind 3: shared and tied weights -------------------------------------------------------


def _svd_params(out, cin, rank, bias=True):
    return rank * cin + out * rank + (out if bias else 0)


@pytest.mark.parametrize("functional", [False, True])
def test_tied_head_counts_once_and_saves_nothing(functional):
    torch.manual_seed(0)
    model, ids = TiedLM(functional).eval(), torch.randint(0, 200, (2, 7))
    before = snapshot(model)
    total = 200 * 32 + (32 * 128 + 128) + (128 * 32 + 32)  # the tied weight once
    assert unique_params(model) == total
    result = fxdecomp.compress(model, (ids,), budget=Budget(params=0.8))
    assert_untouched(model, before)
    assert result.params_before == total
    assert result.params_after == unique_params(result.graph_module) <= 0.8 * total
    head = next(d for d in result.decisions if d.name in ("head", "emb"))
    assert not head.decomposed  # decomposing it would keep the embedding's weight and add factors
    # The smallest reachable: only up and down can save, at rank 1 (hand formula of svd's factors).
    smallest = (total - (32 * 128 + 128 - _svd_params(128, 32, 1)) - (128 * 32 + 32 - _svd_params(32, 128, 1))) / total
    with pytest.raises(BudgetError, match="params budget of 0.3 cannot be reached") as info:
        fxdecomp.compress(model, (ids,), budget=Budget(params=0.3))
    assert info.value.smallest_reachable == pytest.approx(smallest, abs=1e-6)
    assert_untouched(model, before)


def test_tied_head_under_a_flops_budget_reports_the_parameters_it_really_has():
    torch.manual_seed(0)
    model, ids = TiedLM(False).eval(), torch.randint(0, 200, (2, 7))
    result = fxdecomp.compress(model, (ids,), budget=0.5, methods=["svd"])
    assert result.params_after == unique_params(result.graph_module)
    head = next(d for d in result.decisions if d.name == "head")
    if head.decomposed:  # the embedding keeps the weight: the head's factors come on top
        assert head.params_after >= 200 * 32 + _svd_params(200, 32, head.ranks[0], bias=False)


@pytest.mark.parametrize("functional", [False, True])
def test_a_tied_weight_has_one_name_under_both_frontends_and_its_plan_replays_across_them(functional):
    # torch.export reads the tied head through whichever path it picks (``head.weight``), torch.fx
    # through the attribute the code read: names built from the path differed (``emb`` / ``head``).
    torch.manual_seed(0)
    model, ids = TiedLM(functional).eval(), torch.randint(0, 200, (2, 7))
    results = {frontend: fxdecomp.compress(model, (ids,), budget=0.7, methods=["svd"], frontend=frontend)
               for frontend in ("fx", "export")}
    assert results["export"].frontend == "export"
    names = {frontend: sorted(d.name for d in result.decisions) for frontend, result in results.items()}
    assert names["fx"] == names["export"] == sorted(["up", "down", "emb" if functional else "head"])
    saved = [(d.name, d.method, d.ranks) for d in results["export"].decisions]
    replayed = fxdecomp.compress(model, (ids,), plan=results["export"].decisions, frontend="fx")
    assert sorted((d.name, d.method, d.ranks) for d in replayed.decisions) == sorted(saved)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("pattern", ["head", "emb", "he*"])
def test_exclude_names_a_tied_weight_by_any_of_its_paths(frontend, pattern):
    torch.manual_seed(0)
    model, ids = TiedLM(True).eval(), torch.randint(0, 200, (2, 7))
    result = fxdecomp.compress(model, (ids,), budget=0.9, methods=["svd"], exclude=[pattern], frontend=frontend)
    tied = next(d for d in result.decisions if d.name == "emb")
    assert tied.reason == "excluded"
    assert all(d.reason != "excluded" for d in result.decisions if d.name != "emb")


class _TwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 64)
        self.dec = self.enc  # one module under two names: torch.fx names it by the first, torch.export by the one called
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(F.relu(self.dec(x)))


def test_a_module_registered_under_two_names_is_one_layer_under_both_frontends_and_in_the_kept_model():
    torch.manual_seed(0)
    model, x = _TwoNames().eval(), torch.randn(6, 64)
    results = {f: fxdecomp.compress(model, (x,), budget=0.5, pipeline="flops", frontend=f) for f in ("fx", "export")}
    assert [d.name for d in results["fx"].decisions] == [d.name for d in results["export"].decisions]
    assert next(d for d in results["export"].decisions if d.name == "enc").decomposed
    replayed = fxdecomp.compress(model, (x,), plan=results["export"].decisions, frontend="fx")
    assert [(d.name, d.ranks) for d in replayed.decisions] == [(d.name, d.ranks) for d in results["export"].decisions]
    for result in results.values():
        kept = result.apply_to(model)  # both names hold the decomposed module: forward calls ``dec``
        assert kept.enc is kept.dec and not isinstance(kept.dec, nn.Linear)
        with torch.no_grad():
            torch.testing.assert_close(kept(x), result.graph_module(x))


class _DropoutInEval(nn.Module):
    """Dropout that stays on in eval mode (SpeechT5's speech prenet: ``F.dropout(x, p, training=True)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.5, training=True))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_that_draws_random_numbers_in_eval_is_kept_and_the_callers_generator_is_left_alone(frontend):
    # The kept model was checked against the graph on two different random draws, and refused.
    torch.manual_seed(0)
    model, x = _DropoutInEval().eval(), torch.randn(4, 32)
    result = fxdecomp.compress(model, (x,), budget=0.6, frontend=frontend)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    kept = result.apply_to(model, example_inputs=(x,))
    assert torch.equal(torch.rand(3), expected)
    with torch.no_grad():
        torch.manual_seed(1)
        got = kept(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, result.graph_module(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_layer_applied_to_its_own_output_is_rewritten_and_exact_at_full_rank(frontend):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3))))

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(2, 16, 8, 8)
    full = fxdecomp.compress(model, (x,), plan={"conv": ("svd", (16,)), "fc": ("svd", (16,))}, frontend=frontend)
    assert all(d.decomposed for d in full.decisions)
    with torch.no_grad():
        torch.testing.assert_close(full.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    small = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"], frontend=frontend)
    with torch.no_grad():
        torch.testing.assert_close(small.apply_to(model)(x), small.graph_module(x))


def test_count_params_counts_one_storage_once():
    a = nn.Linear(8, 8)
    b = nn.Linear(8, 8)
    b.weight = nn.Parameter(a.weight.data)  # another Parameter object on the same storage
    assert fxdecomp.cost.count_params(nn.ModuleList([a, b])) == 64 + 8 + 8


# ---- kind 4: every FLOP counted, attention included; MHA projections are candidates ----------


def attention_net_flops(batch, length, d):
    tokens = batch * length
    projections = 2 * tokens * d * 3 * d + 2 * tokens * d * d + 2 * tokens * d * d  # in_proj, out_proj, fc
    attention = 2 * (2 * batch * length * length * d)  # q k^T and weights x v, over all heads
    return projections + attention


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_count_flops_sees_attention_in_every_mode(need_weights, grad):
    torch.manual_seed(0)
    model, x = AttentionNet(need_weights=need_weights).eval(), torch.randn(2, 16, 64)
    with torch.set_grad_enabled(grad):
        assert fxdecomp.count_flops(model, (x,)) == attention_net_flops(2, 16, 64)
    model.train()
    before = snapshot(model)
    assert fxdecomp.count_flops(model, (x,)) == attention_net_flops(2, 16, 64)  # counted in eval mode
    assert_untouched(model, before)


def test_count_flops_of_conv_linear_and_sdpa_by_hand():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1), nn.Conv2d(8, 8, 3, padding=1, groups=4))
    x = torch.randn(2, 3, 10, 10)
    assert fxdecomp.count_flops(conv, (x,)) == 2 * (2 * 8 * 5 * 5 * 3 * 9 + 2 * 8 * 5 * 5 * 2 * 9)
    assert fxdecomp.count_flops(nn.Linear(7, 5), (torch.randn(3, 4, 7),)) == 2 * 12 * 7 * 5

    class SDPA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8)
    assert fxdecomp.count_flops(SDPA(), (q, k, k)) == 2 * 2 * (2 * 4 * 10 * 12 * 8)


def test_transformer_encoder_layer_fast_path_is_counted():
    d, ff, batch, length = 32, 64, 2, 6
    layer = nn.TransformerEncoderLayer(d, 4, ff, batch_first=True).eval()
    x = torch.randn(batch, length, d)
    tokens = batch * length
    expected = 2 * tokens * (3 * d * d + d * d + 2 * d * ff) + 2 * 2 * batch * length * length * d
    assert fxdecomp.count_flops(layer, (x,)) == expected


class TorchvisionStyleBlock(nn.Module):
    """torchvision's ViT encoder block: nn.MultiheadAttention (sequence first here) called as self-attention, an MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, dropout=0.0)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.ln(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        return self.mlp(x + y)


@pytest.mark.parametrize("build, x", [
    (lambda: AttentionNet(need_weights=True), torch.randn(2, 16, 64)),
    (lambda: AttentionNet(need_weights=False), torch.randn(2, 16, 64)),
    (TorchvisionStyleBlock, torch.randn(9, 2, 32)),
])
def test_keep_the_model_mode_swaps_an_attention_whose_packed_projection_was_decomposed(build, x):
    """torchvision's vit_b_16 was refused in keep-the-model mode: ``in_proj_weight`` is not a module."""
    from fxdecomp.kept_attention import KeptAttention

    torch.manual_seed(0)
    model = build().eval()
    before = snapshot(model)
    result = fxdecomp.compress(model, (x,), budget=0.5)
    mha = "att" if isinstance(model, AttentionNet) else "self_attention"
    assert {d.name: d.decomposed for d in result.decisions}[f"{mha}.in_proj_weight"]
    kept = result.apply_to(model, example_inputs=(x,))  # checked against the graph
    assert type(kept) is type(model) and isinstance(kept.get_submodule(mha), KeptAttention)
    attention = kept.get_submodule(mha)
    assert attention.in_proj_weight.shape == model.get_submodule(mha).in_proj_weight.shape
    assert (attention.embed_dim, attention.num_heads, attention.batch_first) == (
        model.get_submodule(mha).embed_dim, model.get_submodule(mha).num_heads, model.get_submodule(mha).batch_first)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-4, atol=1e-5)
    assert_untouched(model, before)


def test_keep_the_model_mode_swaps_an_attention_whose_out_proj_alone_was_decomposed():
    """nn.MultiheadAttention's forward hands out_proj.weight to F.multi_head_attention_forward: a swapped out_proj was
    refused at the output check. The attention is a KeptAttention holding its own packed input projection."""
    from fxdecomp.kept_attention import KeptAttention

    torch.manual_seed(0)
    model, x = AttentionNet().eval(), torch.randn(2, 16, 64)
    result = fxdecomp.compress(model, (x,), plan={"att.out_proj": ("svd", (64,))})
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.att, KeptAttention) and isinstance(kept.att.in_proj, nn.Linear)
    torch.testing.assert_close(kept.att.in_proj_weight, model.att.in_proj_weight)
    with torch.no_grad():
        assert relative_error(model(x), kept(x)) < 1e-5


@pytest.mark.parametrize("plan", [{"att.out_proj": ("svd", (8,))}, {"att.in_proj_weight": ("svd", (16,))}])
def test_torchscript_compiles_a_kept_model_with_a_kept_attention(plan):
    torch.manual_seed(0)
    model, x = AttentionNet(need_weights=True).eval(), torch.randn(2, 16, 64)
    kept = fxdecomp.compress(model, (x,), plan=plan).apply_to(model, example_inputs=(x,))
    scripted = torch.jit.script(kept)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), kept(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_transformer_encoder_is_compressed_and_kept_in_either_layout(batch_first):
    """nn.TransformerEncoder(batch_first=True) read self_attn._qkv_same_embed_dim, which the functional attention
    lacked: compress refused the model as if its inputs did not fit."""
    from fxdecomp.kept_attention import KeptAttention

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    result = fxdecomp.compress(model, (x,), budget=0.6)
    assert any(d.decomposed and d.name.endswith("self_attn.in_proj_weight") for d in result.decisions)
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.layers[0].self_attn, KeptAttention)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-4, atol=1e-5)


def test_a_kept_attention_at_full_rank_is_the_attention_for_cross_attention_calls_too():
    from fxdecomp.kept_attention import KeptAttention

    torch.manual_seed(0)
    model, x = AttentionNet().eval(), torch.randn(2, 16, 64)
    result = compress_full_rank(model, (x,), {"att.in_proj_weight": (192, 64)})
    kept = result.apply_to(model, example_inputs=(x,))
    assert isinstance(kept.att, KeptAttention)
    query, memory = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    mask = torch.rand(2, 7) > 0.7
    with torch.no_grad():
        want = model.att(query, memory, memory, key_padding_mask=mask)
        got = kept.att(query, memory, memory, key_padding_mask=mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(fxdecomp.UnsupportedLayerError, match="in_proj_weight"):
        kept.att.in_proj_weight.sum()


def test_attention_model_at_half_budget_keeps_half_of_all_flops():
    torch.manual_seed(0)
    model, x = AttentionNet().eval(), torch.randn(2, 16, 64)
    before = snapshot(model)
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"])
    assert_untouched(model, before)
    assert {d.name for d in result.decisions} == {"att.in_proj_weight", "att.out_proj", "fc"}
    flops_before = attention_net_flops(2, 16, 64)
    assert result.flops_before == flops_before
    # Independently: the result's nn.Linear calls (hooks), the attention itself, and in_proj if kept.
    in_proj = next(d for d in result.decisions if d.name == "att.in_proj_weight")
    kept_in_proj = 0 if in_proj.decomposed else 2 * 32 * 64 * 192
    flops_after = module_flops(result.graph_module, (x,)) + 2 * (2 * 2 * 16 * 16 * 64) + kept_in_proj
    assert flops_after == result.flops_after <= 0.5 * flops_before


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_projections_exact_at_full_rank(need_weights):
    torch.manual_seed(0)
    model, x = AttentionNet(need_weights=need_weights).eval(), torch.randn(2, 16, 64)
    result = compress_full_rank(model, (x,), {"att.in_proj_weight": (192, 64), "att.out_proj": (64, 64), "fc": (64, 64)})
    assert all(d.decomposed for d in result.decisions)
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5


# ---- kind 6: parametrized weights ------------------------------------------------------------


def _trained(model, x):
    model.train()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(x).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model.eval()


def _old_style():
    from torch.nn.utils import spectral_norm, weight_norm

    return nn.Sequential(weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Flatten(), spectral_norm(nn.Linear(8 * 36, 10)))


def _new_style():
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

    return nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Flatten(), spectral_norm(nn.Linear(8 * 36, 16)), orthogonal(nn.Linear(16, 16))
    )


@pytest.mark.parametrize("build, words", [(_old_style, "weight_norm"), (_new_style, "parametrization")])
def test_parametrized_weights_are_decomposed_as_their_effective_weight(build, words):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = _trained(build(), x)  # old-style hooks now leave `weight` a non-leaf tensor (deepcopy refuses it)
    if build is _old_style:
        assert model[0].weight.grad_fn is not None
    before = snapshot(model)
    sides = {"0": (8, 27), "3": (10 if build is _old_style else 16, 288)} | ({} if build is _old_style else {"4": (16, 16)})
    result = compress_full_rank(model, (x,), sides)
    assert_untouched(model, before)
    with torch.no_grad():
        expected = model(x)  # the effective weights, computed by the model itself
    with torch.no_grad():
        assert relative_error(expected, result.graph_module(x)) < 1e-5
    notes = {d.name: d.note for d in result.decisions}
    assert words in notes["0"] and "effective weight" in notes["0"] and "Note on 0" in result.report()
    assert not any("parametrizations" in k or k.endswith(("_g", "_orig")) for k in result.graph_module.state_dict())
    result = fxdecomp.compress(model, (x,), budget=0.5)  # and planning works too
    assert result.flops_after <= 0.5 * result.flops_before
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class StdConv2d(nn.Conv2d):
    """Scaled weight standardization in forward, as timm's ScaledStdConv2d (NFNets) and StdConv2d (BiT) do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * 0.3).view(-1),
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class InputScaledConv2d(nn.Conv2d):
    """Its weight depends on the input: no one weight stands for it."""

    def forward(self, x):
        return F.conv2d(x, self.weight * x.mean(), self.bias, self.stride, self.padding)


class TwiceConv2d(nn.Conv2d):
    """Two conv calls in one forward: not one conv."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding) + F.conv2d(x, self.weight, None, self.stride, self.padding)


def _standardized_net():
    return nn.Sequential(StdConv2d(3, 16, 3, padding=1), nn.ReLU(), StdConv2d(16, 16, 3, padding=1, stride=2, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 9, 10))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_conv_that_standardizes_its_weight_in_forward_is_decomposed_as_its_effective_weight(frontend):
    """timm's NFNets: every conv was refused ("cannot express as pad + conv"), so no budget under 0.97 was reachable."""
    torch.manual_seed(0)
    model, x = _standardized_net().eval(), torch.randn(2, 3, 6, 6)
    before = snapshot(model)
    plan = {name: ("svd", (min(sides),)) for name, sides in {"0": (16, 27), "2": (16, 144), "5": (10, 144)}.items()}
    result = fxdecomp.compress(model, (x,), plan=plan, frontend=frontend)
    assert_untouched(model, before)
    assert type(model[0]) is StdConv2d
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5
    notes = {d.name: d.note for d in result.decisions}
    assert "StdConv2d.forward" in notes["0"] and "effective weight" in notes["0"] and notes["5"] == ""
    assert not any(k.endswith("gain") for k in result.graph_module.state_dict())
    result = fxdecomp.compress(model, (x,), budget=0.5, frontend=frontend)
    assert result.flops_after <= 0.5 * result.flops_before
    kept = result.apply_to(model, example_inputs=(x,))  # the user's class, its standardized convs swapped
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-4, atol=1e-5)
    assert_untouched(model, before)


@pytest.mark.parametrize("cls", [InputScaledConv2d, TwiceConv2d])
def test_a_conv_whose_forward_is_not_one_conv_of_a_fixed_weight_stays_refused_by_name(cls, caplog):
    torch.manual_seed(0)
    model, x = nn.Sequential(cls(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval(), torch.randn(2, 3, 6, 6)
    with caplog.at_level("INFO", logger="fxdecomp"):
        result = fxdecomp.compress(model, (x,), plan={"2": ("svd", (8,))})
    assert [d.name for d in result.decisions] == ["2"]
    assert "not a candidate: 0" in caplog.text and "cannot express as pad + conv" in caplog.text
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5


class StdConvSame(StdConv2d):
    """Weight standardization plus TF-"same" padding computed from the input size (timm's ScaledStdConv2dSame):
    at stride 2 it pads odd and even sizes differently, so no static padding stands for it."""

    def forward(self, x):
        pads = [max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0) for n in x.shape[-2:]]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight - self.weight.mean(), self.bias, self.stride, 0)


def test_a_standardizing_conv_that_pads_by_the_input_size_stays_refused():
    """Its probes were of one odd size, where that padding equals padding=1: it became a plain conv, wrong at even sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(StdConvSame(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), plan={"2": ("svd", (8,))})
    assert [d.name for d in result.decisions] == ["2"]
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5


def test_a_standardizing_conv_keeps_its_hooks_keyword_ones_included():
    """The plain conv lost the flag of a with_kwargs hook: compress raised a raw TypeError from inside the probe."""
    torch.manual_seed(0)
    model, x = _standardized_net().eval(), torch.randn(2, 3, 6, 6)
    calls = []
    model[0].register_forward_hook(lambda module, args, kwargs, out: calls.append(out.shape), with_kwargs=True)
    result = fxdecomp.compress(model, (x,), plan={"5": ("svd", (10,))})  # layer 0 stays, as its plain conv
    calls.clear()
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) < 1e-5
    assert len(calls) == 2  # the user's model, then the graph's kept module: the hook ran in both


def test_a_kept_standardizing_conv_takes_its_folded_batchnorm_as_a_plain_conv():
    """Under torch.export, fold_batchnorm folds into the effective weight; keep-the-model mode put that weight into a copy
    of the user's StdConv2d, whose forward standardized it again (error 0.6, silent without example_inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    model[1].running_mean.normal_(), model[1].running_var.uniform_(0.5, 2), model[1].weight.data.uniform_(0.5, 3)
    model, x = model.eval(), torch.randn(1, 3, 8, 8)
    recipe = fxdecomp.load_recipe("default").with_options(fold_batchnorm={"enabled": True})
    result = fxdecomp.compress(model, (x,), budget=0.7, exclude=["0"], pipeline=recipe, frontend="export")
    kept = result.apply_to(model)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-4, atol=1e-4)


class _ConfiguredNet(nn.Module):
    """A model with a transformers config: what save_pretrained writes and load_compressed reads."""

    def __init__(self):
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig()
        self.std, self.std_norm = StdConv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.same, self.same_norm = SamePaddingConv(16, 16), nn.BatchNorm2d(16)
        self.plain, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)
        for norm in (self.std_norm, self.same_norm):
            norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 3)

    def forward(self, x):
        x = torch.relu(self.std_norm(self.std(x)))
        x = torch.relu(self.same_norm(self.same(x)))
        return self.head(self.plain(x).mean((2, 3)))


@pytest.mark.parametrize("fold", [False, True])
def test_a_kept_model_is_rebuilt_from_its_record_pads_and_folded_convs_included(fold):
    """load_compressed rebuilds a saved kept model from the record in its config, on the meta device: a conv that
    pads in its own forward gets its pad layer back, and a kept standardizing conv with a folded BatchNorm its plain conv."""
    from fxdecomp.keep_model import rebuild_kept
    from fxdecomp.kept_record import RECORD_KEY

    torch.manual_seed(0)
    model, x = _ConfiguredNet().eval(), torch.randn(2, 3, 9, 9)
    recipe = fxdecomp.load_recipe("flops").with_options(fold_batchnorm={"enabled": fold})
    plan = {"same": ("tucker2", (6, 6)), "plain": ("svd", (8,)), "head": ("svd", (4,))}
    result = fxdecomp.compress(model, (x,), plan=plan, pipeline=recipe, frontend="export")
    kept = result.apply_to(model, example_inputs=(x,))
    record = getattr(kept.config, RECORD_KEY)
    assert {layer["name"]: layer["pad"] for layer in record["layers"]} == {"same": [0, 1, 0, 1], "plain": [], "head": []}
    assert len(record["folded"]) == (2 if fold else 0)
    with torch.device("meta"):
        rebuilt = _ConfiguredNet()
    rebuild_kept(rebuilt, record)
    rebuilt.load_state_dict(kept.state_dict(), assign=True)
    y = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(y), kept(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept(y), result.graph_module(y), rtol=1e-4, atol=1e-4)
    assert type(rebuilt.std) is (nn.Conv2d if fold else StdConv2d)


def test_an_unreachable_budget_names_the_layers_that_keep_their_cost():
    """NFNet-L0's BudgetError said only "the smallest reachable is 0.97": not that every conv had been refused."""
    torch.manual_seed(0)
    model = nn.Sequential(InputScaledConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    with pytest.raises(BudgetError) as caught:
        fxdecomp.compress(model, (torch.randn(1, 3, 6, 6),), budget=0.2, exclude=["4"])
    text = str(caught.value)
    assert "1 conv / Linear layer(s) are not candidates, e.g. '0': InputScaledConv2d overrides forward" in text
    assert "1 layer(s) are excluded (4)" in text


def test_unknown_computed_weight_is_refused_naming_the_layer():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.raw = nn.Parameter(torch.randn(4, 4))
            self.weight = self.raw * 2  # a computed tensor, not a parameter: deepcopy refuses it

        def forward(self, x):
            return F.linear(x, self.weight)

    model = nn.Sequential(nn.Linear(4, 4), Scaled())
    before = snapshot(model)
    with pytest.raises(InvalidInputError, match=r"layer '1'.*'1\.weight' is computed"):
        fxdecomp.compress(model, (torch.randn(2, 4),), budget=0.5)
    assert_untouched(model, before)
