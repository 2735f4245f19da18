"""What inputs a torch.export graph accepts (`InputShapes`), and the check of every call against them (`ShapeCheck`).

`input_shapes` reads an exported program's user inputs, in call order and flattened as
torch.export flattens nested inputs: a fixed size, a symbol for a free dimension (one symbol
shared by dimensions that must be equal) and each symbol's range. `install_shape_check` records
them in ``gm.meta[SHAPES_META]`` (which `fxdecomp.export.export_onnx` reads to keep the same
dimensions free) and puts the check first thing in the graph, so that a wrong shape raises
`fxdecomp.ShapeError` naming the input, the dimension and the accepted sizes, instead of
torch's ``Guard failed`` or an error deep inside the graph.

Example::

    install_shape_check(gm, input_shapes(program))
    gm.meta[SHAPES_META].describe()   # "input_ids: (s0 in [1, inf), s1 in [1, inf))"
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import ShapeError

SHAPES_META = "fxdecomp.input_shapes"  # InputShapes in GraphModule.meta

@dataclass(frozen=True)
class InputShapes:
    """The input shapes a captured graph accepts.

    ``sizes[i]`` is input i's shape: an int for a fixed dimension, a symbol name
    for a free one (one symbol shared by dimensions that must be equal), or None
    for a non-tensor input. ``ranges`` holds (symbol, lowest, highest or None = unbounded).
    """

    names: tuple[str, ...]
    sizes: tuple[tuple[int | str, ...] | None, ...]
    ranges: tuple[tuple[str, int, int | None], ...]

    @property
    def dynamic(self) -> bool:
        return bool(self.free_dims())

    def free_dims(self) -> tuple[tuple[int, int], ...]:
        """(input index, dim) of every free dimension."""
        return tuple((i, d) for i, shape in enumerate(self.sizes) if shape for d, s in enumerate(shape) if isinstance(s, str))

    def range_of(self, symbol: str) -> tuple[int, int | None]:
        return next(((lo, hi) for s, lo, hi in self.ranges if s == symbol), (0, None))

    def describe(self) -> str:
        parts = []
        for name, shape in zip(self.names, self.sizes):
            if shape is None:
                continue
            dims = []
            for size in shape:
                if isinstance(size, str):
                    lo, hi = self.range_of(size)
                    dims.append(f"{size} in [{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}")
                else:
                    dims.append(str(size))
            parts.append(f"{name}: ({', '.join(dims)})")
        return "; ".join(parts)

    def check(self, args: tuple) -> None:
        """Raise `ShapeError` naming the first input dimension the graph does not accept."""
        if len(args) != len(self.sizes):
            raise ShapeError(f"the graph takes {len(self.sizes)} inputs ({', '.join(self.names)}), got {len(args)}")
        seen: dict[str, tuple[int, str]] = {}
        for name, shape, arg in zip(self.names, self.sizes, args):
            if shape is None or not isinstance(arg, torch.Tensor):
                continue
            if arg.dim() != len(shape):
                raise ShapeError(
                    f"input {name!r} has {arg.dim()} dimensions {tuple(arg.shape)}, the graph takes {len(shape)}; "
                    f"accepted shapes: {self.describe()}"
                )
            for dim, (want, got) in enumerate(zip(shape, arg.shape)):
                where = f"input {name!r} dim {dim}"
                if isinstance(want, int):
                    if got != want:
                        raise ShapeError(
                            f"{where} is {got}, but the graph was captured with it fixed at {want} (the model, or "
                            f"dynamic_shapes, pinned it); accepted shapes: {self.describe()}. Compress again with "
                            "an example of the size you need, or leave that dimension free"
                        )
                    continue
                lo, hi = self.range_of(want)
                if got < lo or (hi is not None and got > hi):
                    raise ShapeError(
                        f"{where} is {got}, outside the sizes the graph accepts for it ({want} in [{lo}, "
                        f"{hi if hi is not None else 'inf'}]); accepted shapes: {self.describe()}"
                    )
                if want in seen and seen[want][0] != got:
                    raise ShapeError(
                        f"{where} is {got} but {seen[want][1]} is {seen[want][0]}; the graph needs them equal "
                        f"(both {want}); accepted shapes: {self.describe()}"
                    )
                seen.setdefault(want, (got, where))



def input_shapes(program: torch.export.ExportedProgram) -> InputShapes:
    """The `InputShapes` of an exported program's user inputs (from its placeholders and range constraints).

    One entry per user input in call order, constants (``None``, a float) included as non-tensor
    entries: the module's inputs, which its shape check sees, are all of them.
    """
    from torch.export.graph_signature import InputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    names, sizes = [], []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        name = getattr(spec.arg, "name", None) or f"input_{len(names)}"
        names.append(name)
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            sizes.append(None)
            continue
        shape = []
        for size in value.shape:
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is None:
                shape.append(int(size))
            elif expr.is_Symbol:
                shape.append(str(expr))
            else:
                shape.append(int(size.node.hint))  # a derived size: keep the example's, checked by torch's guards
        sizes.append(tuple(shape))
    ranges = []
    for symbol, bounds in program.range_constraints.items():
        ranges.append((str(symbol), _bound(bounds.lower, 0), _bound(bounds.upper, None)))
    return InputShapes(tuple(names), tuple(sizes), tuple(ranges))


def _bound(value: Any, infinite: int | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):  # sympy / torch infinities
        return infinite



def install_shape_check(gm: fx.GraphModule, shapes: InputShapes) -> None:
    """Record ``shapes`` in ``gm.meta`` and check every call's inputs against them, inside the graph.

    The check is a ``call_module`` node right after the placeholders (torch's own
    ``_guards_fn`` node, its module wrapped by `ShapeCheck`, or a new node), so it
    survives deepcopy, pickling and the rewrite passes (the module is impure: never dead code).
    """
    gm.meta[SHAPES_META] = shapes
    guards = getattr(gm, "_guards_fn", None)
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    if isinstance(guards, nn.Module) and node is not None:
        gm._guards_fn = ShapeCheck(shapes, guards)
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    gm.add_submodule("_fxdecomp_shape_check", ShapeCheck(shapes, None))
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_module("_fxdecomp_shape_check", tuple(placeholders))
    gm.recompile()


class ShapeCheck(nn.Module):
    """Checks a graph's inputs against its `InputShapes` (then runs torch.export's guards, if any).

    A wrong shape raises `ShapeError` naming the input, dimension and accepted sizes; a failed
    torch.export guard (``AssertionError``) becomes a `ShapeError` naming the condition. Nothing
    is checked while torch.compile or torch.export traces the graph (symbolic sizes).
    """

    _is_impure = True  # keep the node through dead-code elimination

    def __init__(self, shapes: InputShapes, guards: nn.Module | None):
        super().__init__()
        self.shapes = shapes
        self.guards = guards

    def __deepcopy__(self, memo: dict) -> "ShapeCheck":
        return ShapeCheck(self.shapes, copy.deepcopy(self.guards, memo))

    def __getstate__(self) -> dict:
        # torch.export's guard function wraps its forward in a local closure that cannot be
        # pickled: a pickled (torch.save'd) graph keeps the shape checks and drops those guards.
        state = self.__dict__.copy()
        state["_modules"] = {**state["_modules"], "guards": None}
        return state

    def forward(self, *args: Any) -> Any:
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or any(
            isinstance(s, torch.SymInt) for x in args if isinstance(x, torch.Tensor) for s in x.shape
        )
        if not tracing:
            self.shapes.check(args)
        if self.guards is None:
            return None
        try:
            return self.guards(*args)
        except AssertionError as exc:
            raise ShapeError(
                f"the inputs break a condition the graph was captured under: {exc}. Input shapes "
                f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}; accepted shapes: "
                f"{self.shapes.describe()}"
            ) from None
