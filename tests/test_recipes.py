"""Recipes: the shipped ones resolve to the pipelines they always were; extends, its errors, listing."""

import re
from pathlib import Path

import pytest

from fxdecomp import RecipeError, load_recipe
from fxdecomp.passes.base import _PASSES
from fxdecomp.recipes import available_recipes

ROOT = Path(__file__).resolve().parents[1]
SVD_FAMILY = ("svd", "spatial_svd", "tucker2")
FULL = ["shape_prop", "find_candidates", "annotate_cost", "calibrate", "estimate_ranks", "plan", "rewrite", "verify"]
NO_RANKS = [name for name in FULL if name != "estimate_ranks"]
CORRECTIONS = ["fold_batchnorm", "compensate", "correct_factors", "reestimate_batchnorm"]  # in default, switched off


# The default plan follows latency on this CPU (#16 item 6): ranks on its SIMD block, a static latency model.
CPU_AWARE = {"round_to": 0, "min_efficiency": 0.9, "latency_model": "static"}
DEFAULT_DESCRIPTION = (
    "weight-aware plan over svd, spatial_svd and tucker2; exact knapsack on a fine cost grid, repaired to keep its "
    "savings in onnxruntime on this CPU"
)

# What each shipped recipe resolves to: its description, methods, passes and plan options.
SHIPPED = {
    "default": (DEFAULT_DESCRIPTION, SVD_FAMILY, FULL, {"grid": 24, "cp_grid": 4, **CPU_AWARE}),
    "fast": (
        "svd / spatial_svd / tucker2 only, coarse rank grid, no VBMF annotation",
        SVD_FAMILY, NO_RANKS, {"grid": 12, **CPU_AWARE},
    ),
    "hardware": (
        "svd, spatial_svd and tucker2 (the methods that keep their FLOP savings in onnxruntime), ranks rounded up to "
        "multiples of 16, plans timed in onnxruntime to reach 0.9 of the FLOP reduction in latency",
        SVD_FAMILY, FULL, {"grid": 24, "cp_grid": 4, "round_to": 16, "min_efficiency": 0.9, "latency_model": "measured"},
    ),
    "thorough": (
        "every method: svd, spatial_svd, tucker2, tt, tiled_svd and cp",
        None, FULL, {"grid": 24, "cp_grid": 4, **CPU_AWARE},
    ),
    "cpu": (
        "svd, spatial_svd and tucker2 with ranks rounded to this CPU's SIMD block and a static onnxruntime latency "
        "model reaching 0.9 of the FLOP reduction in latency (nothing timed per option)",
        SVD_FAMILY, FULL, {"grid": 24, "cp_grid": 4, **CPU_AWARE},
    ),
    # The default's plan before it followed latency: the same on every machine.
    "flops": (
        "svd, spatial_svd and tucker2 on the FLOP plan alone, the same on every machine (no rank rounding, no "
        "latency model; weight-only damage e^2)",
        SVD_FAMILY, FULL, {"grid": 24, "cp_grid": 4, "round_to": 1, "min_efficiency": 0.0, "latency_model": "measured"},
    ),
}  # fmt: skip
# Calibrate pass options a recipe sets: the flops recipe keeps the weight-only damage e^2 of the plan it reproduces
# (and of fxdecomp.large.compress_sequential); every other recipe has the pass's default, signal_share.
CALIBRATE_OPTIONS = {"flops": {"weight_damage": "squared"}}


def effective(recipe):
    """Each step with the options its pass will run with (the pass's defaults filled in); passes
    switched off (``enabled = false``: the corrections, until asked for) do nothing and are left out."""
    steps = [(s.name, _PASSES[s.name].Options(**s.options)) for s in recipe.steps]
    return [(name, options) for name, options in steps if getattr(options, "enabled", True)]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes_resolve_to_their_pipelines(name):
    description, methods, passes, plan_options = SHIPPED[name]
    recipe = load_recipe(name)
    options = {"plan": plan_options, "calibrate": CALIBRATE_OPTIONS.get(name, {})}
    expected = [(p, _PASSES[p].Options(**options.get(p, {}))) for p in passes]
    assert (recipe.name, recipe.description, recipe.methods) == (name, description, methods)
    assert effective(recipe) == expected


def test_only_default_lists_its_passes():
    for path in sorted((ROOT / "passes").glob("*.toml")):
        assert ("[[pass]]" in path.read_text()) == (path.stem == "default"), path.name
    assert {load_recipe(n).extends for n in ("fast", "hardware", "thorough", "cpu", "flops")} == {"default"}


def test_available_recipes_are_the_files_in_passes():
    assert available_recipes() == sorted(p.stem for p in (ROOT / "passes").glob("*.toml"))
    assert load_recipe(None) == load_recipe("default")


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_a_user_recipe_extends_a_shipped_one(tmp_path):
    path = write(tmp_path, "mine.toml", 'extends = "hardware"\nmethods = ["svd"]\nwithout = ["verify"]\n[options.plan]\ngrid = 6\n')
    mine, hardware = load_recipe(path), load_recipe("hardware")
    assert (mine.name, mine.extends, mine.methods, mine.description) == ("mine", "hardware", ("svd",), hardware.description)
    expected = [(s.name, {**s.options, "grid": 6} if s.name == "plan" else s.options) for s in hardware.steps if s.name != "verify"]
    assert [(s.name, s.options) for s in mine.steps] == expected
    assert load_recipe(str(path)) == mine


def test_extends_a_path_relative_to_the_recipe_and_chains(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base.toml", 'extends = "fast"\ndescription = "base"\n[options.plan]\nround_to = 8\n')
    leaf = load_recipe(write(tmp_path / "sub", "leaf.toml", 'extends = "../base.toml"\nmethods = "all"\n[options.plan]\ngrid = 3\n'))
    plan = next(s for s in leaf.steps if s.name == "plan")
    assert plan.options == {"grid": 3, "cp_grid": 4, **CPU_AWARE, "round_to": 8}
    assert (leaf.description, leaf.methods, [name for name, _ in effective(leaf)]) == ("base", None, NO_RANKS)


def test_cycles_are_errors(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match=r"cycle: a\.toml -> b\.toml -> a\.toml"):
        load_recipe(tmp_path / "a.toml")
    with pytest.raises(RecipeError, match=r"cycle: self\.toml -> self\.toml"):
        load_recipe(write(tmp_path, "self.toml", 'extends = "self.toml"\n'))


@pytest.mark.parametrize(
    "text, message",
    [
        ('extends = "nope"\n', r"mine\.toml extends 'nope', which is no recipe; known recipes: \[.*'default', "),
        ('extends = "missing.toml"\n', r"extends 'missing\.toml', which is no recipe"),
        ("extends = 3\n", r"extends must name a recipe"),
        ('extends = "default"\nwithout = ["tune"]\n', r"without must list passes of its base 'default'"),
        ('extends = "default"\n[options.tune]\nx = 1\n', r"has no pass 'tune'"),
        ('extends = "default"\n[options.plan]\ngird = 1\n', r"pass 'plan' has no option\(s\) \['gird'\]"),
        ('extends = "default"\nmethods = []\n', r"methods must be a non-empty list"),
        ('extends = "default"\n[[pass]]\nname = "plan"\n', r"unknown key\(s\) \['pass'\].*lists no \[\[pass\]\] tables"),
        ('[options.plan]\ngrid = 3\n[[pass]]\nname = "plan"\n', r"options and without need extends"),
        ('extends = "default"\nwithout = ' + str(FULL + CORRECTIONS).replace("'", '"') + "\n", r"leaves out every pass"),
    ],
)
def test_bad_extends_name_the_problem(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "mine.toml", text))


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match=re.escape(f"no recipe 'nope'; known recipes: {available_recipes()}")):
        load_recipe("nope")
