"""onnxruntime against torch for `fxdecomp.export.export_onnx`: at the example's shapes and at a second one.

The second shape moves each free dimension of the ONNX file by the first step the graph's
own shape check accepts (`SECOND_SHAPE_STEPS`), so a file with a dynamic batch or sequence
length is checked where those dimensions differ from the example.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .benchmark import make_feed
from .errors import InvalidInputError, ParityError, ShapeError
from .graph.effects import eval_mode
from .user_warnings import warn


def check_parity(
    module: nn.Module, session, args: tuple[torch.Tensor, ...], expected: list[torch.Tensor], rtol: float, atol: float,
    second_shape: bool = True,
) -> tuple[tuple[float, float], tuple[tuple[tuple[int, ...], ...], ...]]:
    """((max abs diff, max rel diff), the input shapes checked) of ``session`` against ``module``.

    ``expected``: the module's outputs on ``args``; with ``second_shape``, also at `second_shape`'s
    inputs when the file has free dimensions. Raises `ParityError` beyond ``atol + rtol * |torch|``.
    """
    diffs, checked = _compare(session, args, expected, rtol, atol), (_shapes(args),)
    second = _second_shape(module, args, session) if second_shape else None
    if second is not None:
        more = _compare(session, second[0], second[1], rtol, atol)
        diffs, checked = (max(diffs[0], more[0]), max(diffs[1], more[1])), checked + (_shapes(second[0]),)
    return diffs, checked


def torch_outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The tensors ``module(*args)`` returns (any pytree), without grad; `InvalidInputError` when it fails."""
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception as exc:
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in args)
        raise InvalidInputError(f"the module fails on the example inputs ({shapes}): {exc}") from exc
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def graph_input_shapes(module: nn.Module):
    """The `InputShapes` a graph captured by torch.export carries in its ``meta`` (free dimensions, ranges); None without."""
    from .capture.input_shapes import SHAPES_META

    meta = getattr(module, "meta", None)
    return meta.get(SHAPES_META) if isinstance(meta, dict) else None


def _shapes(args) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(n) for n in a.shape) for a in args)


# How far the second parity shape moves a free dimension, tried in turn: a graph may accept only some
# sizes (Swin: image sides divisible by its window), which its shape check refuses with a ShapeError.
SECOND_SHAPE_STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def _second_shape(module: nn.Module, args: tuple[torch.Tensor, ...], session) -> tuple[tuple, list[torch.Tensor]] | None:
    """(inputs at a second shape the module accepts, its outputs there), or None without one.

    Each free dimension of the ONNX file (dimensions sharing a name together) is moved in turn by
    the first step of `SECOND_SHAPE_STEPS` the module's shape check accepts, keeping the moves
    already accepted; a dimension no step moves keeps its size. When none moves, warns and
    returns None (parity is then checked at the example's shapes only). A failure other than
    the shape check's `ShapeError` is raised (`InvalidInputError`).
    """
    names = list(dict.fromkeys(str(d) for info, x in zip(session.get_inputs(), args) for d in info.shape[: x.dim()] if not isinstance(d, int)))
    steps: dict[str, int] = {}
    accepted = None
    for name in names:
        for step in SECOND_SHAPE_STEPS:
            second = _second_inputs(module, args, session, {**steps, name: step})
            if second is None:
                break  # its range admits no other size
            try:
                with eval_mode(module):
                    accepted = second, torch_outputs(module, second)
            except InvalidInputError as exc:
                if not isinstance(exc.__cause__, ShapeError):
                    raise
                continue
            steps[name] = step
            break
    if names and accepted is None:
        warn(
            f"fxdecomp: parity checked at the example's shapes only: the graph refuses every other size of its free "
            f"dimensions tried ({', '.join(names)} moved by {', '.join(map(str, SECOND_SHAPE_STEPS))})"
        )
    return accepted


def _second_inputs(
    module: nn.Module, args: tuple[torch.Tensor, ...], session, steps: dict[str, int]
) -> tuple[torch.Tensor, ...] | None:
    """``args`` with the ONNX file's symbolic dimensions named in ``steps`` resized (rows repeated cyclically).

    A dimension grows by its step (shrinks, at its upper bound); dimensions sharing a name change
    together; sizes stay within the graph's `InputShapes` ranges. None when no shape changes.
    """
    shapes = graph_input_shapes(module)
    new_sizes: dict[str, int] = {}
    resized = []
    for x, info, k in zip(args, session.get_inputs(), range(len(args))):
        for d, dim in enumerate(info.shape):
            if isinstance(dim, int) or d >= x.dim() or str(dim) not in steps:
                continue
            n, lo, hi, step = int(x.shape[d]), 1, None, steps[str(dim)]
            if shapes is not None and k < len(shapes.sizes) and shapes.sizes[k] and isinstance(shapes.sizes[k][d], str):
                lo, hi = shapes.range_of(shapes.sizes[k][d])
            size = new_sizes.setdefault(str(dim), n + step if hi is None or n + step <= hi else max(n - step, lo))
            if size != n:
                x = x.index_select(d, torch.arange(size) % n)
        resized.append(x)
    return tuple(resized) if any(a.shape != b.shape for a, b in zip(args, resized)) else None


def _compare(session, args, expected: list[torch.Tensor], rtol: float, atol: float) -> tuple[float, float]:
    """(max abs diff, max rel diff) of onnxruntime against torch; ParityError beyond tolerance.

    The relative difference is taken where torch's value is non-zero.
    """
    got = session.run(None, make_feed(session, args))
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise ParityError(f"the ONNX model has {len(got)} outputs ({names}) but torch returns {len(expected)} tensors")
    worst_abs = worst_rel = 0.0
    bad: list[str] = []
    for name, out, ref in zip(names, got, expected):
        a = np.asarray(out, dtype=np.float64)
        b = ref.detach().cpu().to(torch.float64).numpy()
        if a.shape != b.shape:
            bad.append(f"{name}: shape {list(a.shape)} vs torch {list(b.shape)}")
            continue
        diff = np.abs(a - b)
        diff[np.isnan(a) & np.isnan(b)] = 0.0
        diff[(a == b) & np.isinf(a)] = 0.0  # matching infinities
        diff = np.nan_to_num(diff, nan=math.inf)
        outside = int(np.count_nonzero(~(diff <= atol + rtol * np.abs(b))))
        nonzero = b != 0
        rel = float(np.max(diff[nonzero] / np.abs(b[nonzero]))) if nonzero.any() else 0.0
        largest = float(diff.max()) if diff.size else 0.0
        worst_abs, worst_rel = max(worst_abs, largest), max(worst_rel, rel)
        if outside:
            bad.append(
                f"{name}: {outside} of {diff.size} elements differ, max abs diff {largest:.3g}, max rel diff {rel:.3g}"
            )
    if bad:
        error = ParityError(
            f"onnxruntime disagrees with torch beyond atol={atol:g}, rtol={rtol:g}: {'; '.join(bad)}. "
            "Look for ops whose ONNX translation differs (padding, rounding, integer division), "
            "or loosen rtol/atol if the difference is float noise; check=False writes the file anyway"
        )
        error.max_abs_diff, error.max_rel_diff = worst_abs, worst_rel
        raise error
    return worst_abs, worst_rel
