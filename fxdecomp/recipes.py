"""Pipelines as TOML recipes: an ordered list of registered passes and their options.

Recipes are written in the repository's ``passes/`` folder and ship inside the package
(``fxdecomp/_recipes`` in the wheel and the sdist, mapped there by setup.py); they load by
name (``"default"``, ``"fast"``, ``"hardware"``, ``"thorough"``) through
`importlib.resources`, or by path. A recipe names only registered passes and their known
options, in an order where every pass comes after the passes providing the records it
requires; anything else is a `RecipeError` listing what is known.

A recipe either lists its passes (``[[pass]]`` tables with ``name`` and ``options``) or
extends another recipe and states only what differs::

    extends = "default"                      # a shipped recipe, or a path to a .toml (relative to this file)
    description = "..."                      # inherited when left out
    methods = ["svd", "tucker2"]             # or "all"; inherited when left out
    without = ["estimate_ranks"]             # passes of the base left out
    [options.plan]                           # merged into the base's options of that pass
    grid = 12

Example::

    recipe = load_recipe("fast")
    [step.name for step in recipe.steps]   # ['shape_prop', 'find_candidates', ...]
    tuned = load_recipe("hardware").with_options(plan={"min_efficiency": 0.95})
    fxdecomp.compress(model, x, budget=0.5, pipeline=tuned)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .passes import check_order, known_passes
from .passes.base import _PASSES

RESOURCE_PACKAGE = "fxdecomp._recipes"  # where setup.py puts passes/*.toml
LIST_KEYS = {"description", "methods", "pass"}
EXTEND_KEYS = {"description", "methods", "extends", "without", "options"}
ALL_METHODS = "all"


@dataclass(frozen=True)
class Step:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A resolved pipeline: its passes in order, each with its options (a base recipe already merged in).

    ``methods`` None means every method that applies; ``extends`` names the base recipe, if any.
    """

    name: str
    description: str
    steps: tuple[Step, ...]
    methods: tuple[str, ...] | None = None
    extends: str | None = None

    def with_options(self, **options_by_pass: dict[str, Any]) -> "Recipe":
        """A copy with options merged into the named passes, e.g. ``with_options(plan={"round_to": 8})``."""
        return dataclasses.replace(self, steps=_merge_options(self.name, self.steps, options_by_pass))


def _merge_options(recipe: str, steps: tuple[Step, ...], options_by_pass: dict[str, dict[str, Any]]) -> tuple[Step, ...]:
    names = [s.name for s in steps]
    for name, options in options_by_pass.items():
        if name not in names:
            raise RecipeError(f"recipe {recipe!r} has no pass {name!r}; its passes: {names}")
        if not isinstance(options, dict):
            raise RecipeError(f"recipe {recipe!r}: the options of pass {name!r} must be a table (dict), got {options!r}")
        _check_options(recipe, name, options)
    return tuple(Step(s.name, {**s.options, **options_by_pass.get(s.name, {})}) for s in steps)


def _check_options(recipe: str, name: str, options: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(_PASSES[name].Options)}
    if set(options) - known:
        raise RecipeError(
            f"recipe {recipe}: pass {name!r} has no option(s) {sorted(set(options) - known)}; "
            f"its options are {sorted(known) or 'none'}"
        )


# ---- where recipes come from ---------------------------------------------------------------


def recipe_root() -> Traversable:
    """The folder of the shipped recipes.

    Run from a source checkout (``passes/`` and ``pyproject.toml`` beside the package), that
    checkout's ``passes/``, so an edited recipe takes effect without reinstalling; otherwise the
    installed package data ``fxdecomp._recipes`` through `importlib.resources`.

    Raises:
        RecipeError: the installation lacks the recipes (a broken build).
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "passes").is_dir():
        return checkout / "passes"
    try:
        return importlib.resources.files(RESOURCE_PACKAGE)
    except ModuleNotFoundError:
        raise RecipeError(
            f"this installation of fxdecomp ({checkout}) has no shipped recipes ({RESOURCE_PACKAGE} is missing); "
            "reinstall fxdecomp from a wheel or sdist, or give a recipe as a path to a .toml file"
        ) from None


def available_recipes() -> list[str]:
    """Names of the shipped recipes (``passes/*.toml``), sorted."""
    try:
        root = recipe_root()
    except RecipeError:
        return []
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml") and p.is_file())


def _shipped(name: str) -> Traversable | None:
    try:
        source = recipe_root().joinpath(f"{name}.toml")
    except RecipeError:
        return None
    return source if source.is_file() else None


def _locate(recipe: str | os.PathLike, relative_to: Traversable | None = None) -> Traversable:
    """A recipe file: a path ending in .toml, or the name of a shipped recipe.

    A relative path in a recipe's ``extends`` (``relative_to`` set) is taken from that recipe's folder.
    """
    text = os.fspath(recipe)
    if text.endswith(".toml"):
        path: Traversable = Path(text)
        if relative_to is not None and not Path(text).is_absolute():
            path = (relative_to.parent if isinstance(relative_to, Path) else recipe_root()).joinpath(text)
        if path.is_file():
            return path
    shipped = _shipped(text)
    if shipped is None:
        raise RecipeError(f"no recipe {text!r}; known recipes: {available_recipes()} (or give a path to a .toml file)")
    return shipped


# ---- loading -------------------------------------------------------------------------------


def load_recipe(recipe: str | os.PathLike | Recipe | None) -> Recipe:
    """A recipe by name (shipped, from ``passes/``) or by path to a .toml file; None is ``"default"``.

    A `Recipe` is returned as is. A recipe that ``extends`` another is resolved here: the result
    holds the full pass list with the options merged.

    Raises:
        RecipeError: no such recipe, invalid TOML, an unknown key, pass or option, a base recipe
            that does not exist, recipes that extend each other in a cycle, or passes in an order
            where one requires a record no earlier pass provides.
    """
    if isinstance(recipe, Recipe):
        return recipe
    resolved = _resolve(_locate("default" if recipe is None else recipe), chain=())
    check_order([step.name for step in resolved.steps], recipe=f"recipe {resolved.name}")
    return resolved


def _read(source: Traversable) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {str(source)!r} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {str(source)!r}: {exc}") from exc


def _resolve(source: Traversable, chain: tuple[str, ...]) -> Recipe:
    key = str(source)
    label = source.name
    if key in chain:
        names = [Path(c).name for c in (*chain, key)]
        raise RecipeError(f"recipes extend each other in a cycle: {' -> '.join(names)}; one of them must list its passes")
    data = _read(source)
    if "extends" in data:
        return _extend(source, data, (*chain, key))
    unknown = set(data) - LIST_KEYS
    if unknown:
        hint = " (options and without need extends = \"<base recipe>\")" if unknown & EXTEND_KEYS else ""
        raise RecipeError(f"recipe {label}: unknown key(s) {sorted(unknown)}{hint}; known keys: {sorted(LIST_KEYS | EXTEND_KEYS)}")
    steps = []
    for entry in data.get("pass", []):
        name, options = entry.get("name"), entry.get("options", {})
        extra = set(entry) - {"name", "options"}
        if name not in _PASSES or extra:
            raise RecipeError(
                f"recipe {label}: unknown pass {name!r}" + (f" or key(s) {sorted(extra)}" if extra else "")
                + f"; known passes: {known_passes()}"
            )
        _check_options(label, name, options)
        steps.append(Step(name, dict(options)))
    if not steps:
        raise RecipeError(f"recipe {label} lists no passes; add [[pass]] tables naming some of {known_passes()}, or extends = \"default\"")
    return Recipe(_stem(source), data.get("description", ""), tuple(steps), _methods(label, data.get("methods")))


def _extend(source: Traversable, data: dict[str, Any], chain: tuple[str, ...]) -> Recipe:
    label = source.name
    unknown = set(data) - EXTEND_KEYS
    if unknown:
        hint = " (a recipe that extends another lists no [[pass]] tables: use without and [options.<pass>])" if "pass" in unknown else ""
        raise RecipeError(f"recipe {label}: unknown key(s) {sorted(unknown)}{hint}; known keys with extends: {sorted(EXTEND_KEYS)}")
    base_name = data["extends"]
    if not isinstance(base_name, str) or not base_name:
        raise RecipeError(f"recipe {label}: extends must name a recipe (e.g. \"default\") or a .toml path, got {base_name!r}")
    try:
        base_source = _locate(base_name, relative_to=source)
    except RecipeError:
        raise RecipeError(
            f"recipe {label} extends {base_name!r}, which is no recipe; known recipes: {available_recipes()} "
            "(or a path to a .toml file, relative to the extending recipe)"
        ) from None
    base = _resolve(base_source, chain)
    without = data.get("without", [])
    names = [s.name for s in base.steps]
    if not isinstance(without, list) or any(name not in names for name in without):
        raise RecipeError(f"recipe {label}: without must list passes of its base {base.name!r}: {names}; got {without!r}")
    steps = tuple(s for s in base.steps if s.name not in without)
    if not steps:
        raise RecipeError(f"recipe {label} leaves out every pass of {base.name!r}")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise RecipeError(f"recipe {label}: options must be tables [options.<pass>], got {options!r}")
    steps = _merge_options(label, steps, options)
    methods = _methods(label, data["methods"]) if "methods" in data else base.methods
    return Recipe(_stem(source), data.get("description", base.description), steps, methods, extends=base.name)


def _methods(label: str, methods: Any) -> tuple[str, ...] | None:
    if methods is None or methods == ALL_METHODS:
        return None
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise RecipeError(f"recipe {label}: methods must be a non-empty list of method names or \"all\", got {methods!r}")
    return tuple(methods)


def _stem(source: Traversable) -> str:
    return source.name.removesuffix(".toml")
