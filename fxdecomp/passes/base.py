"""Pass infrastructure: the pass base class and the pass registry.

A pass is a callable ``GraphModule -> PassResult(graph_module, modified)`` (the
torch.fx pass-infra shape), built from the `PassContext` and its recipe options.
It names the records (`fxdecomp.records.RECORDS`) it ``requires`` and the ones it
``provides``; the pass manager (`fxdecomp.passes.manager`) checks a recipe's
order against them before running. Analyses only write their records (and
``node.meta``); only the rewrite changes the graph.

Example::

    @register_pass
    class ShapePass(Pass):
        name = "shape_prop"
        provides = ("shapes",)
        def run(self, gm): ...
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import RecipeError, RegistrationError
from ..graph.candidates import CallSite, Candidate
from ..records import RECORDS, PassContext

__all__ = ["CallSite", "Candidate", "Pass", "PassContext", "known_passes", "make_pass", "pass_class", "register_pass"]

log = logging.getLogger("fxdecomp")

_PASSES: dict[str, type[Pass]] = {}


class Pass:
    """Base class: subclasses set ``name``, ``requires`` / ``provides`` (record names), an ``Options`` dataclass, and `run`."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, context: PassContext, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(options) - known
        if unknown:
            raise RecipeError(
                f"pass {self.name!r} has no option(s) {sorted(unknown)}; its options are {sorted(known) or 'none'}"
            )
        self.context = context
        self.options = self.Options(**options)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.run(gm)

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register ``cls`` under ``cls.name``.

    Raises `RegistrationError` if the name is taken or a record it names is unknown.
    """
    taken = _PASSES.get(cls.name)
    if taken is not None:
        raise RegistrationError(
            f"a pass named {cls.name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
            f"give {cls.__qualname__} another name"
        )
    unknown = [r for r in (*cls.requires, *cls.provides) if r not in RECORDS]
    if unknown:
        raise RegistrationError(f"pass {cls.name!r} names unknown record(s) {unknown}; known records: {sorted(RECORDS)}")
    _PASSES[cls.name] = cls
    return cls


def known_passes() -> list[str]:
    return sorted(_PASSES)


def pass_class(name: str) -> type[Pass]:
    """The registered pass class ``name``; `RecipeError` listing the known passes otherwise."""
    cls = _PASSES.get(name)
    if cls is None:
        raise RecipeError(f"unknown pass {name!r}; known passes: {known_passes()}")
    return cls


def make_pass(name: str, context: PassContext, options: dict[str, Any]) -> Pass:
    return pass_class(name)(context, **options)
