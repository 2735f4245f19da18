"""The pass manager: runs a recipe's passes in order, in the shape of torch.fx's pass infrastructure.

Before running it checks the order: every record a pass ``requires`` must be
provided by an earlier pass (or be in the context already), else `RecipeError`
naming the pass and the record. After a pass that reports ``modified`` it lints
and recompiles the graph (``torch.fx.passes.infra.pass_manager.PassManager``
does the same checks after every pass). It times each step and keeps each
step's ``modified``.

Example::

    manager = PassManager.from_steps([("shape_prop", {}), ("find_candidates", {})], context)
    result = manager(gm)
    result.graph_module, result.modified, result.seconds   # {"shape_prop": 0.01, ...}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..errors import FxDecompError, RecipeError
from ..records import PassContext
from .base import Pass, _PASSES, make_pass, pass_class


@dataclass(frozen=True)
class StepRecord:
    """One pass run: its name, wall seconds (building the pass included), and whether it changed the graph."""

    name: str
    seconds: float
    modified: bool


@dataclass(frozen=True)
class ManagerResult:
    """The graph after every pass, whether any pass changed it, and one `StepRecord` per step."""

    graph_module: fx.GraphModule
    modified: bool
    steps: tuple[StepRecord, ...]

    @property
    def seconds(self) -> dict[str, float]:
        """Wall seconds per pass name (a pass run twice counts once, summed)."""
        totals: dict[str, float] = {}
        for step in self.steps:
            totals[step.name] = totals.get(step.name, 0.0) + step.seconds
        return totals


def check_order(passes: Sequence[str | type[Pass]], available: Iterable[str] = (), recipe: str = "recipe") -> None:
    """Raise `RecipeError` if a pass (a registered name, or a class) requires a record no earlier pass
    (nor ``available``) provides; the message names the pass, the record, and the passes that provide it."""
    have = set(available)
    for entry in passes:
        cls = pass_class(entry) if isinstance(entry, str) else entry
        name = cls.name
        missing = [r for r in cls.requires if r not in have]
        if missing:
            providers = sorted(n for n, c in _PASSES.items() if missing[0] in c.provides)
            raise RecipeError(
                f"{recipe}: pass {name!r} requires record {missing[0]!r}, which no earlier pass provides; "
                f"put one of {providers} before it"
            )
        have.update(cls.provides)


class PassManager:
    """Runs passes built on one `PassContext`, after checking their order."""

    def __init__(self, passes: Sequence[Pass], context: PassContext, name: str = "recipe"):
        self.passes = list(passes)
        self.context = context
        self.name = name

    @classmethod
    def from_steps(cls, steps: Iterable[tuple[str, Mapping[str, Any]]], context: PassContext, name: str = "recipe") -> PassManager:
        """Build the passes of ``steps`` ((pass name, options) pairs); their order is checked before any runs."""
        steps = [(step, dict(options)) for step, options in steps]
        check_order([step for step, _ in steps], context.provided(), name)
        return cls([make_pass(step, context, options) for step, options in steps], context, name)

    def check(self) -> None:
        check_order([type(p) for p in self.passes], self.context.provided(), self.name)

    def __call__(self, gm: fx.GraphModule) -> ManagerResult:
        self.check()
        steps, modified = [], False
        for pass_ in self.passes:
            start = time.perf_counter()
            result = pass_(gm)
            gm = result.graph_module
            if result.modified:
                gm.graph.lint()
                gm.recompile()
            steps.append(StepRecord(pass_.name, time.perf_counter() - start, bool(result.modified)))
            modified = modified or bool(result.modified)
            absent = [r for r in pass_.provides if not self.context.has(r)]
            if absent:
                raise FxDecompError(f"pass {pass_.name!r} did not provide {absent}; this is a bug in fxdecomp, please report it")
        return ManagerResult(gm, modified, tuple(steps))
