"""The pass manager: order checks before running, duplicate registrations, modified flags, timings; typed records."""

import ast
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

import fxdecomp
from fxdecomp import meta
from fxdecomp.budget import Budget
from fxdecomp.decomposers import get_decomposer, register
from fxdecomp.decomposers.svd import LinearSVD
from fxdecomp.errors import RecipeError, RegistrationError
from fxdecomp.passes import Pass, PassManager, known_passes, register_pass
from fxdecomp.passes.plan import PlanPass
from fxdecomp.records import MissingRecordError, ModelCost, PassContext, Request

from fxdecomp.examples.vision import VGG

PASSES_DIR = Path(fxdecomp.__file__).parent / "passes"


def _small():
    torch.manual_seed(0)
    return VGG(widths=(8, "M", 16, "M", 16)).eval(), torch.randn(1, 3, 16, 16)


def _context(model, x, budget=0.5):
    gm = fx.symbolic_trace(model)
    return gm, PassContext(Request((x,), budget=Budget.parse(budget)), reference=fx.symbolic_trace(model))


def test_a_recipe_out_of_order_is_refused_before_anything_runs(tmp_path):
    recipe = tmp_path / "backwards.toml"
    recipe.write_text('[[pass]]\nname = "find_candidates"\n\n[[pass]]\nname = "shape_prop"\n')
    with pytest.raises(RecipeError) as info:
        fxdecomp.load_recipe(recipe)
    assert "'find_candidates'" in str(info.value) and "'shapes'" in str(info.value)
    assert "shape_prop" in str(info.value)  # the way out: the pass that provides it

    model, x = _small()
    gm, context = _context(model, x)
    with pytest.raises(RecipeError, match="'rewrite' requires record 'plan'"):
        PassManager.from_steps([("shape_prop", {}), ("find_candidates", {}), ("rewrite", {})], context)
    assert context.provided() == frozenset()  # checked before any pass ran


def test_the_manager_checks_order_when_called_too():
    model, x = _small()
    gm, context = _context(model, x)

    class NeedsCost(Pass):
        name = "needs_cost"
        requires = ("cost",)

        def run(self, gm):
            raise AssertionError("must not run")

    shape = PassManager.from_steps([("shape_prop", {})], context).passes[0]
    with pytest.raises(RecipeError, match="'needs_cost' requires record 'cost'.*annotate_cost"):
        PassManager([shape, NeedsCost(context)], context)(gm)
    assert not context.has("shapes")


def test_registering_a_pass_or_a_decomposer_twice_raises():
    before = known_passes()
    with pytest.raises(RegistrationError, match="'plan' is already registered"):

        @register_pass
        class AnotherPlan(Pass):
            name = "plan"

    assert known_passes() == before
    from fxdecomp.passes.base import pass_class

    assert pass_class("plan") is PlanPass

    with pytest.raises(RegistrationError, match=r"\('linear', 'svd'\) is already registered"):

        @register
        class AnotherSVD(LinearSVD):
            pass

    assert type(get_decomposer("linear", "svd")) is LinearSVD


def test_a_pass_naming_an_unknown_record_is_refused():
    with pytest.raises(RegistrationError, match="unknown record"):

        @register_pass
        class Typo(Pass):
            name = "typo_pass_for_test"
            requires = ("candidate",)

    assert "typo_pass_for_test" not in known_passes()


class _ReluToSigmoid(Pass):
    """Changes the graph and neither lints nor recompiles: the manager must."""

    name = "relu_to_sigmoid"

    def run(self, gm):
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
                changed = True
        return PassResult(gm, changed)


def test_the_manager_recompiles_after_a_modifying_pass_and_keeps_modified():
    class Model(nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    x = torch.randn(4)
    gm = fx.symbolic_trace(Model())
    context = PassContext(Request((x,)))
    result = PassManager([_ReluToSigmoid(context)], context)(gm)
    assert result.modified and [s.modified for s in result.steps] == [True]
    torch.testing.assert_close(result.graph_module(x), torch.sigmoid(x) + 1)  # the recompiled code

    again = PassManager([_ReluToSigmoid(context)], context)(result.graph_module)
    assert not again.modified and [s.modified for s in again.steps] == [False]


def test_compress_steps_are_timed_and_modified_is_kept():
    model, x = _small()
    recipe = fxdecomp.load_recipe("default")
    gm, context = _context(model, x)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PassManager.from_steps([(s.name, s.options) for s in recipe.steps], context)(gm)
    wall = time.perf_counter() - start
    assert [s.name for s in result.steps] == [s.name for s in recipe.steps]
    assert all(s.seconds > 0 for s in result.steps) and sum(s.seconds for s in result.steps) <= wall
    decomposed = [d for d in context.plan.decisions.values() if d.decomposed]
    assert decomposed  # 0.5 of the FLOPs cannot be kept without decomposing
    assert {s.name: s.modified for s in result.steps} == {s.name: s.name == "rewrite" for s in recipe.steps}
    assert result.modified
    rewritten = {n.meta[meta.DECOMPOSED_FROM].original for n in result.graph_module.graph.nodes if meta.DECOMPOSED_FROM in n.meta}
    assert rewritten == {d.name for d in decomposed}

    compressed = fxdecomp.compress(model, (x,), budget=0.5)
    assert list(compressed.pass_seconds) == [s.name for s in recipe.steps]


def test_records_are_typed_and_missing_ones_are_named():
    model, x = _small()
    _, context = _context(model, x)
    with pytest.raises(MissingRecordError, match="'plan'"):
        context.plan
    with pytest.raises(TypeError, match="ModelCost"):
        context.provide("cost", {"flops": 1})
    context.provide("cost", ModelCost(10, 2))
    assert (context.flops_before, context.params_before) == (10, 2)
    assert context.calibration_stats.grams == {}  # optional records read as empty
    assert context.latency.before_ms is None
    with pytest.raises(Exception, match="frozen|cannot assign"):
        context.request.budget = None


def _pass_modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PASSES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        registers = any(
            isinstance(d, ast.Name) and d.id == "register_pass"
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for d in node.decorator_list
        )
        if registers:
            modules[path.stem] = tree
    return modules


def _imported_pass_modules(tree: ast.Module, pass_modules) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("fxdecomp.passes"):
                rest = node.module.split(".")[2:]
                names = rest[:1] if rest else [a.name for a in node.names]
            else:
                continue
            found.update(n for n in names if n in pass_modules)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("fxdecomp.passes.") and a.name.split(".")[2] in pass_modules)
    return found


def test_no_pass_imports_another_pass():
    modules = _pass_modules()
    assert {"shape_prop", "find_candidates", "annotate_cost", "estimate_ranks", "calibrate", "plan", "rewrite", "verify"} <= set(modules)  # the scan sees the passes
    offenders = {name: sorted(_imported_pass_modules(tree, modules) - {name}) for name, tree in modules.items()}
    assert not any(offenders.values()), f"pass modules importing other pass modules: {offenders}"

    planted = ast.parse("from .rewrite import rewrite_graph\nfrom fxdecomp.passes import plan\n")  # the check can fail
    assert _imported_pass_modules(planted, modules) == {"rewrite", "plan"}


def test_verify_times_the_result_at_the_threads_the_plan_was_timed_at(monkeypatch):
    """The thread count comes from the plan's latency record (its options), not from its per-layer timer."""
    import fxdecomp.passes.plan as plan_module

    from tests.planning.test_latency_budget import _leaf_ms, _MemoryBoundTimer

    model, x = _small()
    threads_seen = []
    monkeypatch.setattr(plan_module, "LayerLatency", _MemoryBoundTimer)
    monkeypatch.setattr(plan_module, "model_ms", lambda module, inputs, threads=1, **_: _leaf_ms(module, inputs[0]))

    def timed_after(module, inputs, threads=1, **_):
        threads_seen.append(threads)
        return _leaf_ms(module, inputs[0])

    monkeypatch.setattr("fxdecomp.latency.model_ms", timed_after)
    recipe = fxdecomp.load_recipe("default").with_options(plan={"latency_threads": 3, "replan_tolerance": 0.0})
    result = fxdecomp.compress(model, (x,), budget=Budget(latency=0.9), methods=["svd"], pipeline=recipe)
    assert threads_seen == [3]
    assert result.latency_before_ms == pytest.approx(_leaf_ms(model, x))
    assert result.latency_after_ms == pytest.approx(_leaf_ms(result.graph_module, x))
    assert result.latency_after_ms < result.latency_before_ms
