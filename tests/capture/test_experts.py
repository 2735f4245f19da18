"""Mixture-of-experts weights stored stacked (transformers 5's fused experts): counted, planned per expert, decomposed.

Oracles: the same transformers model run with its ``eager`` experts implementation (a Python loop of
``F.linear`` over ``gate_up_proj[e]``, which torch.utils.flop_counter counts natively), the original
model's outputs at other shapes and routings, and onnxruntime.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxdecomp
from fxdecomp.capture.experts import lower_grouped_experts
from fxdecomp.errors import UnsupportedLayerError
from fxdecomp.export_capture import export_trace

transformers = pytest.importorskip("transformers")

EXAMPLE = (2, 16)


def is_lowered_expert(name: str) -> bool:
    """A decision on one expert of a stack: ``<stack>_expert<e>``."""
    return re.search(r"_expert\d+$", name) is not None
OTHER_SHAPES = ((1, 5), (3, 11))


def mixtral(experts_implementation: str | None = None) -> nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def ids(batch: int, sequence: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, sequence), generator=torch.Generator().manual_seed(seed))


def logits(module, x) -> torch.Tensor:
    with torch.no_grad():
        out = module(x)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def native_flops(module, *inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def compressed():
    model = mixtral()
    x = ids(*EXAMPLE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, x, fxdecomp.compress(model, (x,), budget=0.5), state


def test_count_flops_counts_the_stacked_experts_as_the_eager_loop_does():
    x = ids(*EXAMPLE)
    eager = mixtral("eager")
    expected = fxdecomp.count_flops(eager, (x,))  # F.linear per expert: mm, torch's own formula
    assert fxdecomp.count_flops(mixtral(), (x,)) == expected
    # The experts are most of it: gate_up (2I x H) and down (H x I) for every routed (token, expert) pair.
    config = eager.config
    experts = 2 * config.num_hidden_layers * x.numel() * config.num_experts_per_tok * 3 * config.intermediate_size * config.hidden_size
    assert expected > experts > expected / 2


def test_each_expert_is_planned_and_the_budget_holds_by_an_independent_count(compressed):
    model, x, result, _ = compressed
    experts = [d for d in result.decisions if is_lowered_expert(d.name)]
    assert len(experts) == 2 * 2 * 4  # (gate_up, down) x layers x experts
    assert {d.name for d in experts} >= {"model.layers.0.mlp.experts.gate_up_proj_expert0", "model.layers.1.mlp.experts.down_proj_expert3"}
    assert sum(d.decomposed for d in experts) >= len(experts) // 2
    assert result.flops_ratio <= 0.5 + 1e-6
    assert native_flops(result.graph_module, x) / native_flops(mixtral("eager"), x) <= 0.5 + 0.01
    assert result.params_after < 0.7 * result.params_before  # the experts' parameters, most of the model, shrink


def full_rank(model: nn.Module, name: str) -> int:
    """The largest svd rank of a decision's matrix: min(out, in) of a Linear, or of one expert's slice of a stacked weight."""
    owner, _, attribute = name.rpartition(".")
    if is_lowered_expert(name):
        stacked = getattr(model.get_submodule(owner), attribute.rsplit("_expert", 1)[0])
        return min(stacked.shape[1:])
    return min(model.get_submodule(name).weight.shape)


def test_a_full_rank_plan_reproduces_the_model_at_other_shapes_and_routings(compressed):
    model, x, result, _ = compressed
    full = fxdecomp.compress(model, (x,), plan={d.name: ("svd", (full_rank(model, d.name),)) for d in result.decisions})
    assert all(d.decomposed for d in full.decisions)
    for seed, shape in enumerate(OTHER_SHAPES + (EXAMPLE,)):
        other = ids(*shape, seed=seed + 1)  # other tokens: other experts chosen
        torch.testing.assert_close(logits(full.graph_module, other), logits(model, other), rtol=1e-4, atol=1e-4)


def test_the_users_model_is_left_alone(compressed):
    model, _, _, state = compressed
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    experts = model.model.layers[0].mlp.experts
    assert not any(is_lowered_expert(name) for name, _ in experts.named_parameters())
    assert experts.gate_up_proj.dim() == 3


def test_the_result_exports_to_onnx_and_follows_the_routing_at_other_shapes(compressed, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x, result, _ = compressed
    fxdecomp.export_onnx(result.graph_module, (x,), tmp_path / "moe.onnx")
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate(OTHER_SHAPES):
        other = ids(*shape, seed=10 + seed)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0])
        torch.testing.assert_close(got, logits(result.graph_module, other), rtol=1e-4, atol=1e-4)


def test_keep_mode_keeps_the_experts_module_with_its_experts_decomposed_and_loads_back(compressed, tmp_path):
    import io

    from fxdecomp.kept_experts import AbsentStack, KeptExperts
    from fxdecomp.kept_layer import KeptLayer
    from fxdecomp.large import load_compressed

    model, x, result, _ = compressed
    kept = result.apply_to(model, example_inputs=(x,))  # checked against the graph
    experts = kept.model.layers[0].mlp.experts
    assert type(kept) is type(model) and isinstance(experts, type(model.model.layers[0].mlp.experts))
    assert isinstance(experts.gate_up_proj, AbsentStack) and tuple(experts.gate_up_proj.shape) == (4, 2 * 96, 64)
    assert isinstance(experts.gate_up_proj_experts, KeptExperts)
    decided = {d.name for d in result.decisions if d.decomposed}
    for e, layer in enumerate(experts.gate_up_proj_experts):
        assert isinstance(layer, KeptLayer) == (f"model.layers.0.mlp.experts.gate_up_proj_expert{e}" in decided)
    assert sum(p.numel() for p in kept.parameters()) == result.params_after
    with pytest.raises(UnsupportedLayerError, match="stacked expert weight"):
        experts.gate_up_proj.sum()
    for seed, shape in enumerate(OTHER_SHAPES):
        other = ids(*shape, seed=30 + seed)
        want = logits(result.graph_module, other)
        torch.testing.assert_close(logits(kept, other), want, rtol=1e-5, atol=1e-5)
        kept.set_experts_implementation("eager")  # the Python loop: F.linear(rows, gate_up_proj[e])
        torch.testing.assert_close(logits(kept, other), want, rtol=1e-5, atol=1e-5)
        kept.set_experts_implementation("grouped_mm")
    assert kept.generate(x[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    buffer = io.BytesIO()
    torch.save(kept, buffer)  # the experts module pickles as its own class with the mixin
    buffer.seek(0)
    torch.testing.assert_close(logits(torch.load(buffer, weights_only=False), x), logits(kept, x))
    kept.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_compressed(tmp_path), x), logits(kept, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt-oss", "llama4"])
def test_keep_mode_runs_experts_stored_in_out_through_grouped_and_batched_matmuls(name, tmp_path):
    """GPT-OSS stores (E, in, out) with biases and transformers' grouped matmul reads it as it is; Llama 4's experts
    each take their own rows through one bmm."""
    from fxdecomp.large import load_compressed

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 vocab_size=128, max_position_embeddings=64, num_local_experts=4, head_dim=16)
    if name == "gpt-oss":
        config = transformers.GptOssConfig(num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"], **small)
        cls = transformers.GptOssForCausalLM
    else:
        # Square experts (intermediate = hidden): the layout of a stack must come from the record, not its shape.
        config = transformers.Llama4TextConfig(num_experts_per_tok=1, intermediate_size_mlp=128, no_rope_layers=[1, 1],
                                               **{**small, "intermediate_size": 64})
        cls = transformers.Llama4ForCausalLM
    torch.manual_seed(0)
    model, x = cls(config).eval(), ids(*EXAMPLE)
    result = fxdecomp.compress(model, (x,), budget=0.5)
    assert any(is_lowered_expert(d.name) and d.decomposed for d in result.decisions)
    kept = result.apply_to(model, example_inputs=(x,))
    other = ids(3, 11, seed=7)
    torch.testing.assert_close(logits(kept, other), logits(result.graph_module, other), rtol=1e-5, atol=1e-5)
    kept.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_compressed(tmp_path), other), logits(kept, other), rtol=1e-6, atol=1e-6)


def test_calibration_reaches_each_expert_with_its_own_rows(compressed):
    model, x, weight_only, _ = compressed
    batches = [(ids(2, 16, seed=s),) for s in range(20, 24)]
    calibrated = fxdecomp.compress(model, (x,), budget=0.5, calibration=batches)
    assert any(is_lowered_expert(d.name) and d.decomposed for d in calibrated.decisions)
    held_out = ids(4, 16, seed=99)
    error = {name: float((logits(r.graph_module, held_out) - logits(model, held_out)).norm() / logits(model, held_out).norm())
             for name, r in (("weight-only", weight_only), ("calibrated", calibrated))}
    assert error["calibrated"] < error["weight-only"], error


class GroupedExperts(nn.Module):
    """Experts applied by one grouped matmul over rows sorted by expert: ``aten._grouped_mm`` or transformers' op, on
    a weight stored (E, out, in) and read transposed, or stored (E, in, out) and read as it is."""

    def __init__(self, op: str, stored: str, experts: int = 3, features: int = 8, out: int = 16):
        super().__init__()
        self.op, self.stored = op, stored
        shape = (experts, out, features) if stored == "out_in" else (experts, features, out)
        self.weight = nn.Parameter(torch.randn(*shape) / features**0.5)
        self.router = nn.Linear(features, experts)

    def forward(self, x):
        expert = self.router(x).argmax(-1)
        order = expert.argsort()
        counts = F.one_hot(expert, self.weight.shape[0]).sum(0)
        offs = counts.cumsum(0).to(torch.int32)
        weight = self.weight.transpose(-2, -1) if self.stored == "out_in" else self.weight
        if self.op == "aten":
            y = torch._grouped_mm(x[order], weight, offs=offs)
        else:
            y = torch.ops.transformers.grouped_mm_fallback(x[order], weight, offs)
        return torch.empty_like(y).index_copy_(0, order, y)


@pytest.mark.parametrize("stored", ["out_in", "in_out"])
@pytest.mark.parametrize("op", ["aten", "transformers"])
def test_both_grouped_matmuls_and_both_weight_layouts_are_lowered_exactly(op, stored):
    import transformers.integrations.moe  # noqa: F401  (registers transformers' op)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if op == "aten" else torch.float32  # torch's grouped kernel: bf16 only (torch 2.13)
    model, x = GroupedExperts(op, stored).eval().to(dtype), torch.randn(10, 8, dtype=dtype)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if op == "aten" else {"rtol": 1e-5, "atol": 1e-5}
    gm = lower_grouped_experts(export_trace(model, (x,)))
    assert not any(n.op == "call_function" and "grouped_mm" in str(n.target) for n in gm.graph.nodes)
    assert sum(n.target is F.linear for n in gm.graph.nodes) == 3
    for rows in (10, 4, 17):
        other = torch.randn(rows, 8, dtype=dtype)
        torch.testing.assert_close(gm(other), model(other), **tolerance)
    assert fxdecomp.count_flops(model, (x,)) == 2 * 10 * 8 * 16 + 2 * 10 * 8 * 3  # experts + router
    for frontend in ("fx", "export"):  # fx records torch._grouped_mm / torch.ops.transformers...; export the aten overloads
        result = fxdecomp.compress(copy.deepcopy(model), (x,), budget=0.6, frontend=frontend)
        assert [d.name for d in result.decisions if is_lowered_expert(d.name)] == [f"weight_expert{e}" for e in range(3)]
        assert result.flops_ratio <= 0.6


def test_the_experts_of_a_stack_share_one_option_so_the_budget_holds_at_any_routing():
    config = transformers.Qwen2MoeConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    result = fxdecomp.compress(model, (ids(*EXAMPLE),), budget=0.5)
    stacks: dict[str, set] = {}
    for d in result.decisions:
        if is_lowered_expert(d.name):
            stacks.setdefault(d.name.rsplit("_expert", 1)[0], set()).add((d.method, d.ranks))
    assert len(stacks) == 4 and all(len(options) == 1 for options in stacks.values()), stacks
    assert any(method != "keep" for options in stacks.values() for method, _ in options)
    for seed in range(3):  # other tokens, other routings: the same FLOPs as planned
        other = ids(*EXAMPLE, seed=50 + seed)
        assert fxdecomp.count_flops(result.graph_module, (other,)) == result.flops_after
        assert fxdecomp.count_flops(model, (other,)) == result.flops_before
    assert result.flops_ratio <= 0.5


class BatchedExperts(nn.Module):
    """Every expert on its own rows by one ``torch.bmm`` with a stored (E, in, out) stack (Llama 4's experts)."""

    def __init__(self, experts: int = 3, features: int = 8, out: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, features, out) / features**0.5)

    def forward(self, x):
        return torch.bmm(x.view(self.weight.shape[0], -1, x.shape[-1]), self.weight).relu().sum(0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_batched_matmul_over_a_stored_stack_is_one_linear_per_expert(frontend):
    torch.manual_seed(0)
    model, x = BatchedExperts().eval(), torch.randn(12, 8)
    result = fxdecomp.compress(model, (x,), budget=0.6, frontend=frontend)
    assert [d.name for d in result.decisions] == [f"weight_expert{e}" for e in range(3)]
    assert len({(d.method, d.ranks) for d in result.decisions}) == 1 and result.flops_ratio <= 0.6
    full = fxdecomp.compress(model, (x,), plan={d.name: ("svd", (8,)) for d in result.decisions}, frontend=frontend)
    for rows in (12, 6):
        other = torch.randn(rows, 8)
        torch.testing.assert_close(full.graph_module(other), model(other), rtol=1e-5, atol=1e-5)


class IndexedExperts(nn.Module):
    """``F.linear(rows, self.weight[e])`` per expert, rows split by a routing count (JetMoE's ParallelExperts)."""

    def __init__(self, experts: int = 3, features: int = 8, out: int = 16):
        super().__init__()
        self.num_experts = experts
        self.weight = nn.Parameter(torch.randn(experts, out, features) / features**0.5)

    def forward(self, x, sizes: list[int]):
        rows = x.split(sizes, dim=0)
        return torch.cat([F.linear(rows[e], self.weight[e]) for e in range(self.num_experts)])


class RoutedIndexedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = IndexedExperts()

    def forward(self, x):
        return self.experts(x, [4, 2, 6])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_linear_on_one_indexed_expert_of_a_stack_is_that_experts_linear_and_is_kept(frontend):
    from fxdecomp.kept_experts import AbsentStack

    torch.manual_seed(0)
    model, x = RoutedIndexedExperts().eval(), torch.randn(12, 8)
    result = fxdecomp.compress(model, (x,), budget=0.6, frontend=frontend)
    assert [d.name for d in result.decisions] == [f"experts.weight_expert{e}" for e in range(3)]
    assert result.flops_ratio <= 0.6 and all(d.decomposed for d in result.decisions)
    full = fxdecomp.compress(model, (x,), plan={d.name: ("svd", (8,)) for d in result.decisions}, frontend=frontend)
    torch.testing.assert_close(full.graph_module(x), model(x), rtol=1e-5, atol=1e-5)
    kept = result.apply_to(model, example_inputs=(x,))  # stack[e] with an int: the expert's layer
    assert isinstance(kept.experts.weight, AbsentStack)
    torch.testing.assert_close(kept(x), result.graph_module(x), rtol=1e-5, atol=1e-5)


def test_an_expert_the_example_routes_no_row_to_takes_its_stacks_option():
    """2 tokens x top-2 reach at most 4 of 8 experts: the others cost nothing on the example. Left dense while their
    stack was decomposed, the compressed model ran at 0.78 of the FLOPs on other tokens for a budget of 0.5."""
    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, num_local_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    result = fxdecomp.compress(model, (ids(1, 2),), budget=0.5)
    stacks: dict[str, set] = {}
    for d in result.decisions:
        if is_lowered_expert(d.name):
            stacks.setdefault(d.name.rsplit("_expert", 1)[0], set()).add((d.method, d.ranks))
    assert len(stacks) == 4 and all(len(options) == 1 for options in stacks.values()), stacks
    for seed in range(3):
        other = ids(1, 2, seed=100 + seed)
        assert fxdecomp.count_flops(result.graph_module, (other,)) == result.flops_after
    longer = ids(2, 16, seed=7)
    assert fxdecomp.count_flops(result.graph_module, (longer,)) / fxdecomp.count_flops(model, (longer,)) <= 0.5 + 0.02


def test_a_parameter_already_named_like_an_expert_view_leaves_its_stack_unlowered():
    class Named(GroupedExperts):
        def __init__(self):
            super().__init__("transformers", "out_in")
            self.weight_expert0 = nn.Parameter(torch.randn(16))  # the name the view of expert 0 would take

        def forward(self, x):
            return super().forward(x) + self.weight_expert0

    import transformers.integrations.moe  # noqa: F401  (registers transformers' op)

    torch.manual_seed(0)
    model, x = Named().eval(), torch.randn(10, 8)
    gm = lower_grouped_experts(export_trace(model, (x,)))
    assert any("grouped_mm" in str(n.target) for n in gm.graph.nodes)  # left as it is
    other = torch.randn(7, 8)
    torch.testing.assert_close(gm(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pipeline", ["corrected", "compensated"])
def test_corrections_on_the_compressed_graphs_inputs_leave_the_experts_and_refit_the_rest(compressed, pipeline):
    """The compressed graph routes other tokens to an expert than the original: pairing their rows raised a raw
    IndexError (corrected), or stopped compensation for every layer after the first experts (compensated)."""
    import warnings

    model, x, _, _ = compressed
    batches = [(ids(2, 16, seed=s),) for s in range(40, 44)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "does not run through the captured graph" would be one
        result = fxdecomp.compress(model, (x,), budget=0.5, calibration=batches, pipeline=pipeline)
    assert any(is_lowered_expert(d.name) and d.decomposed for d in result.decisions)
    other = ids(3, 11, seed=9)
    assert torch.isfinite(logits(result.graph_module, other)).all()


def test_excluding_a_stack_or_its_experts_module_by_path_keeps_its_experts_dense(compressed):
    model, x, _, _ = compressed
    stack, module = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts"
    result = fxdecomp.compress(model, (x,), budget=0.7, exclude=[stack, module])
    excluded = [d for d in result.decisions if d.name.startswith((stack + "_expert", module + "."))]
    assert len(excluded) == 4 + 8 and all(not d.decomposed for d in excluded)


def test_an_experts_implementation_fxdecomp_does_not_lower_is_named(recwarn):
    model = mixtral("batched_mm")
    x = ids(*EXAMPLE)
    try:
        fxdecomp.compress(model, (x,), budget=0.9)
    except fxdecomp.FxDecompError:
        pass  # the budget may be out of reach without the experts: the warning names why
    assert any("'batched_mm' experts implementation" in str(w.message) and "grouped_mm" in str(w.message) for w in recwarn)


def test_a_kept_mixture_is_streamed_again_and_its_experts_stay_as_kept(compressed, tmp_path):
    """compress_sequential took the longest ModuleList, a KeptExperts of 4 experts over 2 layers, for the blocks (a raw
    shape error), and its record dropped the experts, so the saved model did not load back."""
    from fxdecomp.kept_experts import KeptExperts
    from fxdecomp.large import compress_sequential, load_compressed

    model, x, result, _ = compressed
    kept = result.apply_to(model, example_inputs=(x,))
    again = compress_sequential(kept, (x,), budget=0.9)
    assert not any(".gate_up_proj_experts." in d.name for d in again.decisions)  # the kept experts are not planned again
    assert isinstance(again.model.model.layers[0].mlp.experts.gate_up_proj_experts, KeptExperts)
    again.model.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    torch.testing.assert_close(logits(loaded, x), logits(again.model, x), rtol=1e-5, atol=1e-5)


def test_a_kept_mixture_is_captured_whole_compressed_again_and_exported(compressed, tmp_path):
    """torch.export could not trace the kept experts' row split (int() of a data-dependent size): compressing a kept
    MoE again was a partial capture that apply_to refused, and export_onnx of it failed."""
    from fxdecomp.large import load_compressed

    model, x, result, _ = compressed
    kept = result.apply_to(model, example_inputs=(x,))
    again = fxdecomp.compress(kept, (x,), budget=0.8)
    assert not again.partial and again.flops_ratio <= 0.8
    assert not any(d.decomposed for d in again.decisions if "_experts." in d.name)  # the kept experts stay as kept
    for seed in range(2):
        other = ids(*EXAMPLE, seed=60 + seed)
        assert fxdecomp.count_flops(again.graph_module, (other,)) == again.flops_after
    twice = again.apply_to(kept, example_inputs=(x,))
    twice.save_pretrained(tmp_path / "twice")
    other = ids(3, 11, seed=61)
    torch.testing.assert_close(logits(load_compressed(tmp_path / "twice"), other), logits(twice, other), rtol=1e-6, atol=1e-6)
    report = fxdecomp.export_onnx(kept, (x,), tmp_path / "kept.onnx")
    assert report.max_abs_diff < 1e-4
