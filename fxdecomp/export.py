"""Checked ONNX export: torch.onnx's dynamo exporter, a dynamic batch, an onnxruntime parity check.

Example::

    from fxdecomp.export import export_onnx
    report = export_onnx(model, (torch.randn(1, 3, 224, 224),), "model.onnx")
    report.max_abs_diff, report.inputs  # (TensorInfo(name='x', shape=('batch', 3, 224, 224), dtype='float32'),)

The file is written atomically, and only once onnxruntime agrees with torch: on a
`ParityError` the target path is left as it was. Each ONNX node is named after the
module it comes from, ``<qualified name>/<op type>`` (e.g. ``features.3.0/Conv``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .benchmark import TensorInfo, io_info, open_session
from .errors import ExportError, InvalidInputError, ParityError
from .export_capture import no_kv_cache
from .onnx_attention import has_attention, with_math_attention
from .graph.effects import eval_mode
from .onnx_parity import check_parity, graph_input_shapes, torch_outputs
from .user_warnings import warn

__all__ = ["ExportReport", "TensorInfo", "export_onnx"]

# Protobuf caps a file at 2 GB; above this many bytes of weights, write them to a side file.
EXTERNAL_DATA_BYTES = 1_500_000_000
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote. The diffs are None when the parity check was skipped."""

    path: str
    opset: int
    max_abs_diff: float | None
    max_rel_diff: float | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    external_data: bool
    # Input shapes at which onnxruntime was checked against torch: the example's, and a second
    # shape with every free dimension changed when the file has any (dynamic batch, sequence length).
    checked_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_onnx(
    module: nn.Module,
    example_inputs: tuple | torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    check: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Export ``module`` to ONNX at ``path`` and check it against torch in onnxruntime.

    ``dynamic_batch`` makes dim 0 of every input and output symbolic; for a graph captured by
    torch.export (`fxdecomp.compress` results), every dimension its `InputShapes` leaves free
    (batch, sequence length) stays free instead. With free dimensions, parity is also checked at
    a second shape where each of them is one larger (or smaller at its upper bound). ``external_data``
    (None: when the weights exceed ~1.5 GB) writes the weights to ``<path>.data``.
    An output is accepted when ``|onnx - torch| <= atol + rtol * |torch|`` everywhere.
    The module is exported in eval mode; its modes, parameters and hooks are left as they were.
    A GraphModule whose scaled_dot_product_attention trips torch.onnx's decomposition
    (pytorch/pytorch#136543: T5's SDPA attention) is exported from a copy with attention as
    torch's math kernel (`fxdecomp.onnx_attention`), checked against ``module`` all the same.
    Raises `ExportError` (naming the exporter's failure and a fix) when torch.onnx cannot export,
    `ParityError` when onnxruntime disagrees (``path`` is then left as it was). A transformers model
    (``config.use_cache``) is exported and checked with the cache off, as `fxdecomp.compress` captures it.
    """
    args = _check_args(module, example_inputs, path, opset, rtol, atol, input_names)
    # transformers models return their KV cache as an object no ONNX output can hold: export without it.
    with no_kv_cache(module):
        target = Path(path)
        if external_data is None:
            external_data = _weight_bytes(module) > EXTERNAL_DATA_BYTES
        with eval_mode(module):
            expected = torch_outputs(module, args) if check else None
            program, rewritten = _export(module, args, opset, dynamic_batch, input_names, output_names)
        model = program.model
        actual_opset = model.opset_imports.get("", opset)
        if actual_opset != opset:
            raise ExportError(
                f"opset {opset} was asked for, but the exporter could only produce opset {actual_opset} "
                f"(it translates at opset >= 18 and converting down failed); pass opset={actual_opset} or higher"
            )
        name_nodes_after_modules(model)

        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            staged = scratch / target.name
            program.save(staged, external_data=bool(external_data))
            data = scratch / f"{target.name}.data"  # the exporter's side file, referenced by this relative name
            session = _session(staged, module)
            diffs, checked = (None, None), ()
            if expected is not None:
                try:
                    diffs, checked = check_parity(module, session, args, expected, rtol, atol, second_shape=dynamic_batch)
                except ParityError as exc:
                    if rewritten:
                        exc.add_note("the file was exported from a copy with attention as torch's math kernel (fxdecomp.onnx_attention)")
                    raise
            report = ExportReport(
                str(target),
                actual_opset,
                *diffs,
                io_info(session.get_inputs()),
                io_info(session.get_outputs()),
                data.exists(),
                checked,
            )
            del session
            if data.exists():
                os.replace(data, target.parent / data.name)
            os.replace(staged, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return report


def _session(path: Path, module: nn.Module):
    """onnxruntime's session of the written file; a load failure of a bfloat16 / float64 model says what to do."""
    try:
        return open_session(path, threads=max(1, torch.get_num_threads()))
    except InvalidInputError as exc:
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()} & {torch.bfloat16, torch.float64}
        if not dtypes:
            raise
        raise InvalidInputError(
            f"{exc}. onnxruntime's CPU execution provider has no kernel for some operators at "
            f"{', '.join(sorted(str(d) for d in dtypes))}: export a float32 copy (copy.deepcopy(module).float(), "
            "with float32 example inputs), or float16"
        ) from exc


# ---- inputs and module state ---------------------------------------------------------------


def _check_args(module, example_inputs, path, opset, rtol, atol, input_names) -> tuple[torch.Tensor, ...]:
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"export_onnx needs an nn.Module, got {type(module).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    nested = [a for a in args if isinstance(a, (tuple, list, dict))] if isinstance(args, (tuple, list)) else []
    if any(isinstance(leaf, torch.Tensor) for a in nested for leaf in tree_leaves(a)):
        raise InvalidInputError(
            "export_onnx takes the module's inputs as flat tensors; these hold a tuple, list or dict. ONNX graphs take "
            "flat inputs: export a wrapper module whose forward takes the tensors one by one and builds the structure"
        )
    if not isinstance(args, (tuple, list)) or not all(isinstance(a, torch.Tensor) for a in args):
        raise InvalidInputError("example_inputs must be a tensor or a tuple of tensors (the module's positional inputs)")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 7:
        raise InvalidInputError(f"opset must be an int >= 7 (18 or more recommended), got {opset!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise InvalidInputError(f"{name} must be a number >= 0, got {tol!r}")
    if input_names is not None and len(input_names) != len(args):
        raise InvalidInputError(f"input_names has {len(input_names)} names for {len(args)} example inputs")
    target = Path(path)
    if target.is_dir():
        raise InvalidInputError(f"{str(target)!r} is a directory; give a file path such as model.onnx")
    if not target.parent.is_dir():
        raise InvalidInputError(f"directory {str(target.parent)!r} does not exist; create it first")
    return tuple(args)


def _weight_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the exporter ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: its progress prints, warnings and torch / onnxscript log records."""
    names = ["torch", "onnxscript", "onnx_ir"]
    names += [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("torch", "onnxscript", "onnx_ir")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamic_shapes(args: tuple[torch.Tensor, ...]) -> tuple:
    sizes = {a.shape[0] for a in args if a.dim() > 0}
    shared = torch.export.Dim("batch")
    dims = [shared if len(sizes) == 1 else torch.export.Dim(f"batch_{i}") for i in range(len(args))]
    return tuple({0: d} if a.dim() > 0 else None for a, d in zip(args, dims))


def _export(module, args, opset, dynamic_batch, input_names, output_names) -> tuple[Any, bool]:
    """(the torch.onnx.ONNXProgram, whether it was exported from a copy with attention written out)."""
    dynamic_shapes = None
    export_args = args
    shapes = graph_input_shapes(module)
    if dynamic_batch and shapes is not None and shapes.dynamic and len(shapes.sizes) == len(args):
        dynamic_shapes, export_args = _free_dims_spec(args, shapes)
    elif dynamic_batch and args:
        dynamic_shapes = _dynamic_shapes(args)
        # torch.export specialises size-1 dims: at batch 1 some ops (circular padding) fail with
        # "Constraints violated (batch)". Capture at batch 2; the check below runs the user's batch.
        if all(a.dim() > 0 and a.shape[0] == 1 for a in args):
            export_args = tuple(torch.cat([a, a]) for a in args)

    def run(exported: nn.Module, shapes=dynamic_shapes, inputs=export_args) -> Any:  # torch.onnx.ONNXProgram
        with _quiet():
            return torch.onnx.export(
                exported,
                inputs,
                None,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=list(input_names) if input_names is not None else None,
                output_names=list(output_names) if output_names is not None else None,
            )

    try:
        return run(module), False
    except Exception as exc:
        retry = None
        if _is_view_stride_failure(exc) and isinstance(module, fx.GraphModule) and has_attention(module):
            try:  # the exporter's SDPA decomposition changed strides under a view: export the math kernel instead
                return run(with_math_attention(module)), True
            except Exception as again:  # report the user's graph's failure, the retry's as a note
                retry = again
        for shapes, inputs, what in _fewer_free_dims(dynamic_shapes, args) if retry is None else ():
            # Symbolic shape reasoning over many free dims can fail where fewer succeed (torchvision's DenseNet at
            # 32 px: "The inequality ... cannot be solved"): a file with fewer free dims beats no file.
            try:
                program = run(module, shapes, inputs)
            except Exception:
                continue
            warn(
                f"fxdecomp: ONNX export with the free input dimensions {_describe_spec(dynamic_shapes)} failed "
                f"({type(exc).__name__}: {_summary(exc)[:200]}); exported with {what}"
            )
            return program, False
        error = ExportError(_export_failure(module, exc, opset, dynamic_batch, retry))
        if retry is not None:
            error.add_note(f"the retry with attention as torch's math kernel failed too: {type(retry).__name__}: {retry}")
        raise error from exc


def _fewer_free_dims(spec, args: tuple[torch.Tensor, ...]) -> list[tuple[Any, tuple[torch.Tensor, ...], str]]:
    """Export specs to retry with: (spec, inputs, what it keeps free). Only the batch dimension, where ``spec``
    frees more; never fewer (``dynamic_batch`` asks for a free batch)."""
    if spec is None:
        return []
    batch_only = tuple({0: d[0]} if isinstance(d, dict) and 0 in d else None for d in spec)
    if batch_only == tuple(spec) or not any(batch_only):
        return []
    # Size 1 specialises: a free batch of 1 is exported at 2 (a fixed dim 0, a broadcast input, stays as it is).
    inputs = tuple(torch.cat([a, a]) if free is not None and a.dim() > 0 and a.shape[0] == 1 else a for a, free in zip(args, batch_only))
    return [(batch_only, inputs, "only the batch dimension free (the file runs at the example's other sizes)")]


def _describe_spec(spec) -> str:
    return str([sorted(d) if isinstance(d, dict) else [] for d in spec]) if spec is not None else "[]"


def _summary(exc: Exception) -> str:
    """The exporter's own "Exception summary" of ``exc`` on one line (its whole text when it has none)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = text.split("## Exception summary", 1)[-1].split("(Refer to the full stack trace", 1)[0]
    return " ".join(line.strip() for line in summary.splitlines() if line.strip()) or type(exc).__name__


def _is_view_stride_failure(exc: Exception) -> bool:
    """The exporter's decomposition produced strides an earlier ``view`` cannot take (see `fxdecomp.onnx_attention`)."""
    return "Cannot view a tensor with shape" in str(exc)


def _view_failure_hint(module: nn.Module, retry: Exception | None) -> str:
    eager = "use the model's eager attention (transformers: attn_implementation='eager')"
    if retry is not None:
        return f"the retry with attention as torch's math kernel failed too (see the note); {eager}"
    if isinstance(module, fx.GraphModule):  # no scaled_dot_product_attention call in the graph to write out
        return f"the graph calls no scaled_dot_product_attention that could be written out; {eager}"
    return (
        "a GraphModule (the graph fxdecomp.compress returns, or torch.export.export(model, args).module()) "
        f"is retried with attention written out; or {eager}"
    )


def _free_dims_spec(args: tuple[torch.Tensor, ...], shapes) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """The torch.export spec keeping ``shapes``' free dims free (Dim.AUTO), and args with no free dim of size 1.

    Export specialises size-1 dimensions, so those are exported at size 2 (repeated
    rows); the parity check runs the user's own inputs.
    """
    spec, export_args = [], []
    for x, shape in zip(args, shapes.sizes):
        free = [d for d, s in enumerate(shape or ()) if isinstance(s, str)]
        spec.append({d: torch.export.Dim.AUTO for d in free} or None)
        for d in free:
            if x.shape[d] == 1 and (shapes.range_of(shape[d])[1] or 2) >= 2:
                x = torch.cat([x, x], dim=d)
        export_args.append(x)
    return tuple(spec), tuple(export_args)


def _export_failure(module: nn.Module, exc: Exception, opset: int, dynamic_batch: bool, retry: Exception | None = None) -> str:
    from torch.onnx._internal.exporter._errors import ConversionError, TorchExportError

    summary_line = _summary(exc)[:600]
    if isinstance(exc, TorchExportError):
        fix = (
            "torch.export could not capture the forward: make it traceable (no data-dependent Python "
            "control flow, no untraceable calls)"
        )
        if dynamic_batch:
            fix += "; if the model fixes its batch size, pass dynamic_batch=False"
    elif _is_view_stride_failure(exc):
        fix = (
            "the exporter's decomposition of an operator (usually scaled_dot_product_attention on transposed "
            "heads, pytorch/pytorch#136543) left strides an earlier view cannot take; "
            + _view_failure_hint(module, retry)
        )
    elif isinstance(exc, ConversionError):
        fix = f"an operator has no ONNX translation at opset {opset}: try a newer opset, or replace the operator"
    else:
        fix = "see the chained exception for the exporter's own report"
    return f"ONNX export of {type(module).__name__} failed: {summary_line}. Fix: {fix}"


def name_nodes_after_modules(model) -> None:
    """Rename each node of an onnx_ir model to ``<module qualified name>/<op type>``, unique.

    The dynamo exporter records the module path in the ``pkg.torch.onnx.name_scopes``
    metadata (['', 'features', 'features.3', 'features.3.0', 'conv2d_4']); its own
    names (``node_Conv_27``) do not say where a node came from. Nodes at the top
    level are named by op type alone; nodes without the metadata keep their names.
    """
    taken: set[str] = set()
    for node in model.graph.all_nodes():
        base = node.name or node.op_type
        raw = node.metadata_props.get(_SCOPES_KEY)
        if raw:
            try:
                scopes = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                scopes = []
            path = scopes[-2] if len(scopes) >= 3 else ""
            base = f"{path}/{node.op_type}" if path else node.op_type
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        node.name = name
