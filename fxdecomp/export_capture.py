"""torch.export capture with dynamic shapes, and a result that behaves like a module.

`export_trace` exports a model with every input dimension marked
``torch.export.Dim.AUTO`` (torch.export keeps a dimension free where the model
allows it and fixes it where the model needs one size), so batch and sequence
length stay free, in tensors nested in tuples, lists and dicts too. Tensors of
size 1 in dim 0 are exported at 2, because export fixes dimensions of size 1
(its 0/1 specialisation); each free dimension is then checked at size 1
against the eager model before size 1 is accepted, and a graph that refuses the
user's own example is exported again at the example's shapes.

The result is ``ExportedProgram.module()`` made module-like:

- ``.eval()`` / ``.train()`` work (torch 2.13's module refuses them); dropout of
  every kind and torch's BatchNorm1d/2d/3d become modules again
  (`fxdecomp.capture.export_modules`), so they follow the mode. Dropout applied
  always and BatchNorm look-alikes stay as captured.
- inputs are checked first thing in the graph (`fxdecomp.capture.input_shapes.ShapeCheck`): a wrong shape raises `ShapeError`
  naming the input, the dimension and the sizes it accepts (`InputShapes`),
  instead of torch's ``Guard failed`` assertion or an error deep in the graph.
- ``gm.meta[SHAPES_META]`` holds the `InputShapes`, which `export_onnx` reads
  to keep the same dimensions free in the ONNX file.

Example::

    gm = export_trace(model, (torch.randint(0, 100, (1, 16)),))     # batch 1, sequence 16
    gm(torch.randint(0, 100, (4, 9)))                               # any batch and sequence length
    gm.meta[SHAPES_META].describe()   # "input_ids: (s0 in [1, inf), s1 in [1, inf))"

Source: torch.export dynamic shapes (https://pytorch.org/docs/stable/export.html,
``Dim.AUTO``; 0/1 specialisation).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .capture.export_modules import restore_modules
from .capture.input_shapes import SHAPES_META, InputShapes, install_shape_check, input_shapes  # noqa: F401  (SHAPES_META: importable here as before)
from .errors import InvalidInputError, ShapeError

log = logging.getLogger(__name__)

DYNAMIC_CHOICES = ("auto", "static")


def check_dynamic_shapes(dynamic_shapes: Any) -> Any:
    """Validate ``compress(dynamic_shapes=...)``: "auto", "static", or a torch.export dynamic_shapes spec."""
    if isinstance(dynamic_shapes, str) and dynamic_shapes not in DYNAMIC_CHOICES:
        raise InvalidInputError(
            f"dynamic_shapes must be 'auto', 'static' or a torch.export dynamic_shapes spec, got {dynamic_shapes!r}"
        )
    if dynamic_shapes is None or dynamic_shapes is False:
        return "static"
    return dynamic_shapes


def export_trace(model: nn.Module, example_inputs: tuple, dynamic_shapes: Any = "auto") -> fx.GraphModule:
    """Capture ``model`` with torch.export (non-strict) as a module-like GraphModule; see the module docstring.

    ``dynamic_shapes``: "auto" (default) leaves every dimension free that the model allows;
    "static" fixes every dimension at the example's size; anything else is passed to
    ``torch.export.export`` as its ``dynamic_shapes`` (e.g. ``({0: Dim.AUTO, 1: Dim.STATIC},)``
    pins dim 1 of the first input). A model with a transformers-style ``config.use_cache`` is
    captured with the cache off (the graph returns no cache). Raises whatever torch.export raises.
    """
    dynamic_shapes = check_dynamic_shapes(dynamic_shapes)
    with no_kv_cache(model):
        spec, export_args = _export_spec(model, example_inputs, dynamic_shapes)
        try:
            program = torch.export.export(model, export_args, dynamic_shapes=spec, strict=False)
        except Exception as exc:
            if dynamic_shapes != "auto":
                raise
            log.info("torch.export with free dimensions failed (%s); exporting at the example's shapes", exc)
            spec, export_args = None, example_inputs
            program = torch.export.export(model, export_args, strict=False)
        gm = as_module(program, model)
        shapes = input_shapes(program)
        if shapes.dynamic:
            shapes = _allow_size_one(shapes, gm, model, example_inputs, export_args)
            if export_args is not example_inputs and not _accepts(shapes, example_inputs):
                # Exported with size-1 dimensions at 2, the graph does not take the user's example (it does not
                # reproduce the model at 1, or export tied a broadcast size-1 dimension to the batch): export
                # again at the user's own shapes, which the result must always accept.
                log.info("the graph exported at size 2 does not take %s's example; exporting at the example's shapes", type(model).__name__)
                spec = _auto_spec(example_inputs, model)
                try:
                    program = torch.export.export(model, example_inputs, dynamic_shapes=spec, strict=False)
                except Exception as exc:
                    log.info("torch.export at the example's shapes with free dimensions failed (%s); exporting them fixed", exc)
                    program = torch.export.export(model, example_inputs, strict=False)
                gm, shapes = as_module(program, model), input_shapes(program)
                if shapes.dynamic:  # dimensions the example has at 2 or more may still hold at 1
                    shapes = _allow_size_one(shapes, gm, model, example_inputs, example_inputs)
            for node in gm.graph.nodes:  # symbolic (or batch-2) metadata: shape_prop recomputes at the example
                node.meta.pop("val", None)
    install_shape_check(gm, shapes)
    return gm


def _accepts(shapes: "InputShapes", example_inputs: tuple) -> bool:
    """Whether the shape check passes the example: every size in range, and equal where the graph needs it."""
    try:
        shapes.check(tuple(tree_leaves(example_inputs)))
    except ShapeError:
        return False
    return True


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Run with ``config.use_cache = False`` on the model and every submodule whose config has it on.

    transformers models return their KV cache as an object that torch.export and torch.onnx cannot
    flatten. Submodules can hold configs of their own (T5's decoder stack: a copy of the model's
    config, read by its forward): each is switched off, and restored on exit.
    """
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)] if getattr(c, "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _export_spec(model: nn.Module, example_inputs: tuple, dynamic_shapes: Any) -> tuple[Any, tuple]:
    if dynamic_shapes == "static":
        return None, example_inputs
    if dynamic_shapes != "auto":
        return dynamic_shapes, example_inputs
    export_args = example_inputs
    # Every tensor of size 1 in dim 0 (nested ones too) is tried at 2: export fixes what it sees at 1. Where that
    # was a size-1 tensor broadcast beside batched ones (HF position_ids), the graph refuses the example and
    # export_trace exports again at the example's shapes.
    ones = [x for x in tree_leaves(example_inputs) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1]
    if ones:
        doubled = tree_map(lambda x: torch.cat([x, x]) if any(x is o for o in ones) else x, example_inputs)
        try:
            with torch.no_grad():
                model(*doubled)
            export_args = doubled
        except Exception as exc:  # the model fixes its batch: export at the user's shapes
            log.info("%s does not run at batch 2 (%s); batch stays 1", type(model).__name__, exc)
    return _auto_spec(export_args, model), export_args


def _auto_spec(args: tuple, model: nn.Module) -> tuple:
    """torch.export's dynamic_shapes with every dimension of every tensor free, nested inputs (tuples, lists, dicts) too.

    Arguments that ``model.forward`` gathers in ``*args`` get one entry, a tuple, as torch.export reads the signature.
    """
    specs = tuple(tree_map(lambda x: {d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None, x) for x in args)
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return specs
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        return specs
    fixed = kinds.index(inspect.Parameter.VAR_POSITIONAL)
    return (*specs[:fixed], specs[fixed:])


def as_module(program: torch.export.ExportedProgram, model: nn.Module | None = None) -> fx.GraphModule:
    """``program.module()`` with working ``train()``/``eval()``, in eval mode, with dropout as nn dropout
    modules and (given the exported ``model``) its nn.BatchNorm1d/2d/3d as modules again."""
    gm = program.module()
    for name in ("train", "eval"):  # torch 2.13 shadows them with methods that raise NotImplementedError
        gm.__dict__.pop(name, None)
    # torch's lambda hooks (they toggle nn.Module-typed graph inputs, which tensor inputs never are)
    # make the module unpicklable: torch.save(gm) and the CLI's --out would fail.
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") == "<lambda>"]:
            del hooks[key]
            gm._forward_hooks_always_called.pop(key, None)
    gm._tracer_cls = None  # torch.load re-traces the code: export's tracer cannot be rebuilt, fx's default can
    restore_modules(gm, model)
    return gm.eval()


def _allow_size_one(
    shapes: InputShapes, gm: fx.GraphModule, model: nn.Module, example_inputs: tuple, export_args: tuple
) -> InputShapes:
    """Accept size 1 for each free dimension export started at 2, where the graph matches eager at size 1.

    Each symbol is tried alone at 1, the others at their exported sizes. Batch dimensions (the
    export doubled them, ``export_args`` against ``example_inputs``, or they lead an input) may
    fail alone yet hold together:
    export can leave an attention mask's batch a symbol of its own that eager broadcasts from 1
    but the graph indexes by the batch of the other inputs (transformers' BART). Those are then
    tied into one symbol, checked at the example's sizes and at 1 together, so the graph refuses
    unequal batches with a `ShapeError` instead of failing inside.
    """
    ranges = {symbol: (lo, hi) for symbol, lo, hi in shapes.ranges}
    # Batch-like symbols: those the export doubled, and every input's leading one (an example of batch 2: BERT's mask).
    batch_like = {
        shape[d]
        for x, shape, e in zip(tree_leaves(export_args), shapes.sizes, tree_leaves(example_inputs))
        if shape and isinstance(x, torch.Tensor)
        for d in range(x.dim())
        if isinstance(shape[d], str) and (x.shape[d] != e.shape[d] or d == 0)
    }
    failed = set()
    for symbol, (lo, hi) in ranges.items():
        if lo != 2:
            continue
        if _same_outputs(gm, model, _at_one(export_args, shapes, {symbol})):
            ranges[symbol] = (1, hi)
        else:
            failed.add(symbol)
    tie = sorted(_tie_group(gm, model, export_args, shapes, failed & batch_like, batch_like - failed), key=_symbol_order)
    if (failed & batch_like and len(tie) > 1 and _equal_sizes(export_args, shapes, tie) and _equal_sizes(example_inputs, shapes, tie)
            and _same_outputs(gm, model, example_inputs) and _same_outputs(gm, model, _at_one(export_args, shapes, set(tie)))):
        log.info("the graph holds at batch 1 only with %s equal: they are tied", ", ".join(tie))
        shapes = _tied(shapes, tie)
        hi = min((ranges[s][1] for s in tie if ranges[s][1] is not None), default=None)
        ranges = {s: r for s, r in ranges.items() if s not in tie[1:]}
        ranges[tie[0]] = (1, hi)
        failed -= set(tie)
    for symbol in sorted(failed, key=_symbol_order):
        log.info("the graph does not reproduce the model with %s = 1; sizes from 2 up are accepted", symbol)
    return InputShapes(shapes.names, shapes.sizes, tuple((s, lo, hi) for s, (lo, hi) in ranges.items()))


def _tie_group(gm, model, export_args: tuple, shapes: InputShapes, failed: set[str], passed: set[str]) -> set[str]:
    """The batch symbols to tie: those that failed alone, with each that passed and lets them hold at 1 together.

    Every batch-like symbol when that smaller group does not hold at 1 with the rest at their exported sizes.
    """
    if not failed:
        return set()
    group = set(failed) | {p for p in passed if _same_outputs(gm, model, _at_one(export_args, shapes, failed | {p}))}
    if group != failed | passed and not _same_outputs(gm, model, _at_one(export_args, shapes, group)):
        return failed | passed
    return group


def _equal_sizes(args: tuple, shapes: InputShapes, symbols: list[str]) -> bool:
    """Whether every dimension carrying one of ``symbols`` has one size in ``args``: only such symbols can be one."""
    sizes = {
        x.shape[d]
        for x, shape in zip(tree_leaves(args), shapes.sizes)
        if isinstance(x, torch.Tensor) and shape
        for d, size in enumerate(shape)
        if size in symbols
    }
    return len(sizes) <= 1


def _symbol_order(symbol: str) -> tuple:
    return (len(symbol), symbol)  # s11 before s43, s9 before s10


def _at_one(args: tuple, shapes: InputShapes, symbols: set[str]) -> tuple:
    """``args`` with every dimension that carries one of ``symbols`` cut to size 1 (``shapes`` lists their leaves)."""
    leaves, structure = tree_flatten(args)
    out = []
    for x, shape in zip(leaves, shapes.sizes):
        if isinstance(x, torch.Tensor) and shape:
            for d, size in enumerate(shape):
                if size in symbols:
                    x = x.narrow(d, 0, 1)
        out.append(x)
    return tuple(tree_unflatten(out, structure))


def _tied(shapes: InputShapes, symbols: list[str]) -> InputShapes:
    """``shapes`` with every symbol of ``symbols`` renamed to the first."""
    rename = {s: symbols[0] for s in symbols}
    sizes = tuple(None if shape is None else tuple(rename.get(s, s) if isinstance(s, str) else s for s in shape) for shape in shapes.sizes)
    return InputShapes(shapes.names, sizes, shapes.ranges)


def _same_outputs(gm: fx.GraphModule, model: nn.Module, args: tuple) -> bool:
    try:
        with torch.no_grad():
            got = [t for t in tree_leaves(gm(*args)) if isinstance(t, torch.Tensor)]
            want = [t for t in tree_leaves(model(*args)) if isinstance(t, torch.Tensor)]
    except Exception as exc:
        log.info("size-1 check failed: %s", exc)
        return False
    return len(got) == len(want) and all(
        g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5, equal_nan=True) for g, w in zip(got, want)
    )


