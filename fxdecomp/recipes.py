"""Pipelines as TOML recipes: an ordered list of registered passes and their options.

Recipes live in the repository's ``passes/`` folder and load by name
(``"default"``, ``"fast"``, ``"hardware"``) or by path. A recipe names only
registered passes and their known options, in an order where every pass comes
after the passes providing the records it requires; anything else is a
`RecipeError` listing what is known.

Example::

    recipe = load_recipe("fast")
    [step.name for step in recipe.steps]   # ['shape_prop', 'find_candidates', ...]
    tuned = load_recipe("hardware").with_options(plan={"min_efficiency": 0.95})
    fxdecomp.compress(model, x, budget=0.5, pipeline=tuned)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .passes import check_order, known_passes
from .passes.base import _PASSES

RECIPE_DIR = Path(__file__).resolve().parent.parent / "passes"
RECIPE_KEYS = {"description", "methods", "pass"}


@dataclass(frozen=True)
class Step:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    methods: tuple[str, ...] | None = None

    def with_options(self, **options_by_pass: dict[str, Any]) -> "Recipe":
        """A copy with options merged into the named passes, e.g. ``with_options(plan={"round_to": 8})``."""
        names = {step.name for step in self.steps}
        for name, options in options_by_pass.items():
            if name not in names:
                raise RecipeError(f"recipe {self.name!r} has no pass {name!r}; its passes: {[s.name for s in self.steps]}")
            _check_options(self.name, name, options)
        steps = tuple(Step(s.name, {**s.options, **options_by_pass.get(s.name, {})}) for s in self.steps)
        return dataclasses.replace(self, steps=steps)


def _check_options(recipe: str, name: str, options: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(_PASSES[name].Options)}
    if set(options) - known:
        raise RecipeError(
            f"recipe {recipe}: pass {name!r} has no option(s) {sorted(set(options) - known)}; "
            f"its options are {sorted(known) or 'none'}"
        )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []


def load_recipe(recipe: str | os.PathLike | Recipe | None) -> Recipe:
    """A recipe by name (in ``passes/``) or by path to a .toml file; None is ``"default"``; a Recipe is returned as is."""
    if isinstance(recipe, Recipe):
        return recipe
    recipe = "default" if recipe is None else recipe
    path = Path(recipe)
    if not (path.suffix == ".toml" and path.is_file()):
        path = RECIPE_DIR / f"{recipe}.toml"
        if not path.is_file():
            raise RecipeError(f"no recipe {str(recipe)!r}; known recipes: {available_recipes()} (or give a path to a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid TOML: {exc}") from exc
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"recipe {path.name}: unknown key(s) {sorted(unknown)}; known keys: {sorted(RECIPE_KEYS)}")
    steps = []
    for entry in data.get("pass", []):
        name, options = entry.get("name"), entry.get("options", {})
        extra = set(entry) - {"name", "options"}
        if name not in _PASSES or extra:
            raise RecipeError(
                f"recipe {path.name}: unknown pass {name!r}" + (f" or key(s) {sorted(extra)}" if extra else "")
                + f"; known passes: {known_passes()}"
            )
        _check_options(path.name, name, options)
        steps.append(Step(name, dict(options)))
    if not steps:
        raise RecipeError(f"recipe {path.name} lists no passes; add [[pass]] tables naming some of {known_passes()}")
    check_order([step.name for step in steps], recipe=f"recipe {path.name}")
    methods = tuple(data["methods"]) if "methods" in data else None
    return Recipe(path.stem, data.get("description", ""), tuple(steps), methods)
