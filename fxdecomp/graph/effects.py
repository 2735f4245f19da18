"""Side effects in a captured graph: which nodes must survive dead-code elimination.

torch.fx's own `Node.is_impure` knows aten ops with a mutable schema and a few
side-effectful functions, but not the Python-level forms an fx trace holds:
in-place tensor methods (``t.mul_(2)``, ``t.copy_(s)``), in-place torch
functions (``torch.relu_``), augmented assignment (``operator.iadd``), the
``inplace=True`` / ``out=`` keyword, modules built with ``inplace=True``, and calls fx does not see into
(``torch.fx.wrap``'d functions, higher-order operators), which may write into their arguments.
A node whose result nobody reads may still write into a tensor that somebody
reads; `has_side_effect` keeps every such node.

Example::

    gm.graph.eliminate_dead_code(is_impure_node=has_side_effect)
"""

from __future__ import annotations

import builtins
import contextlib
import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
}


def _inplace_name(name: str) -> bool:
    """``mul_``, ``index_put_``, ``__setitem__``, ``__iadd__``: the names of in-place tensor methods."""
    if name.startswith("__") and name.endswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and name not in ("__init__", "__iter__", "__index__", "__invert__"))
    return name.endswith("_") and not name.startswith("_")


def has_side_effect(node: fx.Node) -> bool:
    """True if running ``node`` may change state other than its own result (an input, a buffer, the RNG).

    Covers fx's `Node.is_impure` (mutable aten schemas, side-effectful functions,
    random ops), in-place methods and functions by their trailing underscore,
    augmented assignment and ``setitem``, ``inplace=True`` and ``out=`` keywords,
    and modules with ``inplace=True`` or ``_is_impure``.
    """
    try:
        if node.is_impure():
            return True
    except Exception:  # a graph without an owning module: judge by the rules below
        pass
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        return _inplace_name(str(node.target))
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        if isinstance(target, torch._ops.OpOverloadPacket):
            return any(getattr(target, o)._schema.is_mutable for o in target.overloads())
        # A function fx did not trace into may write into its arguments (torchvision MViT's fx.wrap'd _add_shortcut
        # does ``x.add_(q)`` and its result goes unused): kept, whatever its name.
        return _inplace_name(getattr(target, "__name__", "")) or opaque_function(target)
    if node.op == "call_module" and node.graph.owning_module is not None:
        module = node.graph.owning_module.get_submodule(str(node.target))
        return getattr(module, "inplace", False) is True or getattr(module, "_is_impure", False)
    return False


def opaque_function(target) -> bool:
    """A function the graph calls without seeing into it: a ``torch.fx.wrap``'d Python function or a higher-order
    operator (not a torch op, an ``operator`` or a builtin)."""
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    if getattr(operator, getattr(target, "__name__", ""), None) is target or getattr(builtins, getattr(target, "__name__", ""), None) is target:
        return False
    module = getattr(target, "__module__", None) or ""
    return not (module == "torch" or module.startswith(("torch.", "torch._")))


def mutates_state(gm: fx.GraphModule) -> bool:
    """True if some node of ``gm`` writes in place (so running it may change its buffers or inputs)."""
    return any(has_side_effect(n) for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every submodule's own flag back (not one flag for all)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class preserved_buffers:
    """Context manager: the module's buffers (e.g. a counter its forward increments) are put back on exit.

    Analyses and verification run the model; a forward that writes into its buffers
    must not leave the compressed model in another state than the user's. Parameters
    are not copied (a forward that writes into its weights is not supported). A plain
    callable (not an nn.Module) has no buffers to keep.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        buffers = self.module.buffers() if isinstance(self.module, torch.nn.Module) else ()
        self.saved = [(b, b.detach().clone()) for b in buffers]
        return self.module

    def __exit__(self, *exc):
        with torch.no_grad():
            for buffer, value in self.saved:
                if buffer.shape == value.shape:
                    buffer.copy_(value)
        return False


def fresh_inputs(example_inputs: tuple) -> tuple:
    """A private copy of each tensor input, so that a model writing into its inputs changes only the copy."""
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
