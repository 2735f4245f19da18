"""Saved-plan replay: a plan read from what `compress` returned, and its decisions re-made on a model.

A saved plan is ``result``, ``result.decisions``, ``result.to_dict()`` (or its
"decisions" list), or a mapping name -> (method, ranks); `replay` applies it
with the same methods and ranks and no search (no budget).

Example::

    fixed = normalize_plan(result.to_dict())   # {"features.3": ("tucker2", (16, 32)), ...}
    decisions = replay(ctx, fixed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import InvalidInputError
from ..ranks import resolve_ranks
from ..result import CompressionResult, Decision
from .damage import predicted_error
from .factors import factorization
from .grid import Choice, decision, keep_choice, structure_cost


def normalize_plan(plan) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """A saved plan (a result, its decisions, its to_dict(), or name -> (method, ranks)) as name -> (method, ranks)."""
    if plan is None:
        return None
    if isinstance(plan, CompressionResult):
        plan = plan.decisions
    if not isinstance(plan, (Mapping, Sequence)) or isinstance(plan, (str, bytes)):
        raise InvalidInputError(
            f"cannot read a plan from {type(plan).__name__}; give result.decisions, result.to_dict() "
            "or a mapping name -> (method, ranks)"
        )
    if isinstance(plan, Mapping) and "decisions" in plan:
        plan = plan["decisions"]
    entries = plan.items() if isinstance(plan, Mapping) else [(_field(d, "name"), d) for d in plan]
    fixed = {}
    for name, entry in entries:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            method, ranks = entry
        else:
            method, ranks = _field(entry, "method"), _field(entry, "ranks")
        try:
            fixed[str(name)] = (str(method), tuple(int(r) for r in ranks))
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"plan entry {name!r}: ranks must be a tuple of ints (as result.decisions holds them), got {ranks!r}"
            ) from None
    return fixed


def _field(entry, key):
    try:
        return entry[key] if isinstance(entry, Mapping) else getattr(entry, key)
    except (KeyError, AttributeError):
        raise InvalidInputError(f"a plan entry lacks {key!r}: {entry!r}; give result.decisions or result.to_dict()") from None


def replay(ctx, fixed_plan: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, Decision]:
    """One decision per candidate from ``fixed_plan`` (absent layers kept); names must match the model's layers.

    Raises `InvalidInputError` for a name the model lacks or a method that does not apply to its layer.
    """
    unknown = sorted(set(fixed_plan) - set(ctx.candidates))
    if unknown:
        raise InvalidInputError(
            f"the plan names layers this model does not have: {unknown}; known layers: {sorted(ctx.candidates)}"
        )
    decisions = {}
    for candidate in ctx.candidates.values():
        method, ranks = fixed_plan.get(candidate.name, ("keep", ()))
        choice = keep_choice(candidate)
        if candidate.hooks:  # named in find_candidates' warning: its replacement would not run the user's hooks
            decisions[candidate.name] = decision(candidate, choice, "hooks")
            continue
        if method != "keep":
            decomposer, state = factorization(ctx, candidate, method)
            if state is None:
                raise InvalidInputError(f"the plan's method {method!r} does not apply to layer {candidate.name!r}")
            ranks = resolve_ranks(tuple(ranks), decomposer, candidate.spec, state)
            flops, params = structure_cost(decomposer, candidate, ranks)
            choice = Choice(method, ranks, flops, params, predicted_error(ctx, candidate, method, ranks))
        decisions[candidate.name] = decision(candidate, choice, "plan")
    return decisions
