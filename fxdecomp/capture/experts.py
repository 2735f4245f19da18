"""Mixture-of-experts weights made visible: a grouped matmul over stacked expert weights becomes one Linear per expert.

transformers (5.x) stores the experts of a mixture-of-experts block (Mixtral, Qwen3-MoE,
DeepSeek, ...) as 3-D parameters, ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), and
applies them, under torch.export, with one grouped matmul over rows sorted by expert:
``transformers::grouped_mm_fallback(x, W.transpose(-2, -1), offs)``, or ``aten._grouped_mm`` where
torch's kernel runs. Such a call is neither a Linear nor a conv: its weights, most of an MoE
model's, were neither counted nor decomposed. `lower_grouped_experts` rewrites the call as what it
computes: rows ``offs[e-1]:offs[e]`` times expert e's (out, in) matrix, one ``F.linear`` per
expert on a view of the stacked weight (no copy), the results joined in row order, and rows past
``offs[-1]`` zero (as transformers' fallback leaves them). ``bmm(x (E, T, K), W (E, K, N))`` over a stored stack
(Llama 4's experts, each on its own T rows) becomes one ``F.linear`` per expert too, the results stacked; and
``F.linear(x, W[e])`` on a stored stack (JetMoE's experts) reads expert e's view. Each expert is then a Linear candidate
of its own, registered as ``<weight path>_expert<e>``: planned, calibrated on the rows routed to
it, and decomposed like any other Linear; `fxdecomp.planning.tied` plans the experts of a stack at one option,
an expert the example routes no row to included. A stack whose view names its module already uses is left as it is.

The lowered graph follows the routing at run time (the split sizes are read from ``offs``), and it
exports to ONNX with them free, where transformers' op has no ONNX translation. Written here: no library lowers transformers' grouped
matmul (its eager loop over ``torch.mm`` is the reference, `transformers.integrations.moe`).

Example::

    gm = lower_grouped_experts(export_trace(mixtral, (ids,)))
    # F.linear(rows_e, model.layers.0.mlp.experts.gate_up_proj_expert0), ... per expert
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten
log = logging.getLogger(__name__)

GROUPED_MM_OPS = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")
EXPERT_SUFFIX = "_expert"
EXPERTS_PATTERN = f"*{EXPERT_SUFFIX}[0-9]*"  # an `exclude` pattern for every lowered expert (not Qwen2-MoE's shared_expert)
EXPERT_STACKS = "fxdecomp.expert_stacks"  # GraphModule.meta: {stacked weight path: stored (E, out, in)?} of the lowered stacks


def stacks_of(gm) -> dict[str, bool]:
    """The stacks `lower_grouped_experts` lowered in ``gm``: {stack path: stored (E, out, in)?} (``gm.meta``)."""
    return getattr(gm, "meta", {}).get(EXPERT_STACKS, {})


def expert_of(stacks: dict[str, bool], name: str) -> tuple[str, int] | None:
    """(stack, e) where ``name`` is expert e's view ``<stack>_expert<e>`` of a lowered stack in ``stacks``, else None."""
    stack, found, index = name.rpartition(EXPERT_SUFFIX)
    return (stack, int(index)) if found and stack in stacks and index.isdigit() else None


def is_grouped_mm(node: fx.Node) -> bool:
    """Whether ``node`` calls a grouped matmul (`is_grouped_mm_function`)."""
    return node.op == "call_function" and is_grouped_mm_function(node.target)


def is_grouped_mm_function(target) -> bool:
    """Transformers' fallback op or ``aten._grouped_mm``, as torch.export records them (op overloads), as torch.fx
    does (``torch.ops.transformers.grouped_mm_fallback``, ``torch._grouped_mm``), or ``F.grouped_mm``."""
    if isinstance(target, torch._ops.OpOverload):
        return target.name() in GROUPED_MM_OPS
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name in GROUPED_MM_OPS
    return target is getattr(torch, "_grouped_mm", None) or target is getattr(F, "grouped_mm", None)


def stacked_weights(module: nn.Module) -> list[str]:
    """Names of weights stored stacked, one 3-D floating parameter for several matrices (transformers 5's
    mixture-of-experts ``gate_up_proj`` / ``down_proj``), which no Linear module holds; conv kernels left out."""
    return [
        f"{owner}.{name}" if owner else name
        for owner, child in module.named_modules()
        if not isinstance(child, (nn.Conv1d, nn.ConvTranspose1d))
        for name, parameter in child.named_parameters(recurse=False)
        if parameter.dim() == 3 and parameter.shape[0] > 1 and parameter.is_floating_point()  # not a (1, N, D) table
    ]


def grouped_mm_flops(input_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a grouped matmul (2 per multiply-add): every row of ``input`` meets one (K, N) matrix.

    Shapes: input (S, K) with mat2 (E, K, N) -> 2 S K N; input (E, M, K) with mat2 (E, K, N) -> 2 E M K N;
    input (M, K) with mat2 (K, N) grouped along K -> 2 M K N. A formula for
    `torch.utils.flop_counter.FlopCounterMode`, which has none for these ops (torch 2.13).
    """
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    return 2 * rows * input_shape[-1] * mat2_shape[-1]


def grouped_mm_flop_formulas() -> dict:
    """``custom_mapping`` entries for FlopCounterMode: the grouped matmul ops this process has registered."""
    packets = [aten._grouped_mm, getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)]
    return {packet: grouped_mm_flops for packet in packets if packet is not None}


def split_expert_rows(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of ``x`` (S, K) per expert, ``offs`` (E,) being cumulative row counts: E chunks, then the rows past offs[-1]."""
    sizes, start = [], 0
    for end in offs.tolist():
        if isinstance(end, int):
            sizes.append(max(end - start, 0))
            start = max(start, end)
        else:  # traced (torch.export of a kept model): an unbacked size, cumulative counts never decrease
            torch._check(end >= start)
            sizes.append(end - start)
            start = end
    sizes.append(x.shape[0] - start)
    return tuple(x.split(sizes))


def join_expert_rows(outputs: list[torch.Tensor], rest: torch.Tensor) -> torch.Tensor:
    """The experts' outputs in row order, and zeros for the rows no expert takes (``rest``)."""
    zeros = outputs[0].new_zeros((rest.shape[0], outputs[0].shape[1]))
    return torch.cat([*outputs, zeros])


def lower_grouped_experts(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite in place every grouped matmul over a stored 3-D weight as one ``F.linear`` per expert; returns ``gm``.

    A call whose weight is not a stored (E, K, N) tensor, or its transpose ``(E, N, K).transpose(-2, -1)``,
    whose bias or output dtype is set, or whose input is not 2-D, is left as it is. The stacked
    parameter is removed from ``gm`` once nothing reads it (its experts' views keep the storage).
    """
    stacked = {
        path for node in list(gm.graph.nodes)
        for path in [_lower(gm, node) if is_grouped_mm(node) else _lower_bmm(gm, node) if _is_bmm(node)
                     else _lower_selected(gm, node) if _selects_expert(node) else None] if path
    }
    if stacked:
        _drop_unread(gm, stacked)
        gm.graph.lint()
        gm.recompile()
    return gm


def _lower(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Lower one call; the stacked weight's path, or None where the call is left as it is."""
    x, weight_node, offs = (list(node.args) + [node.kwargs.get("offs")])[:3]
    if any(node.kwargs.get(k) is not None for k in ("bias", "out_dtype")) or len(node.args) > 3:
        return None
    found = _stacked_weight(gm, weight_node)
    shape = x.meta.get("val").shape if isinstance(x, fx.Node) and "val" in x.meta else None
    if found is None or not isinstance(offs, fx.Node) or (shape is not None and len(shape) != 2):
        return None
    path, stacked, transposed = found
    if not _claim(gm, path, stacked, transposed):
        return None
    with gm.graph.inserting_before(node):
        chunks = gm.graph.call_function(split_expert_rows, (x, offs))
        outputs = _expert_outputs(gm, path, stacked, transposed, chunks)
        rest = gm.graph.call_function(operator.getitem, (chunks, stacked.shape[0]))
        joined = gm.graph.call_function(join_expert_rows, (outputs, rest))
    return _replace(gm, node, joined, weight_node, path)


def _is_bmm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.bmm.default, torch.bmm)


def _lower_bmm(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``bmm(x (E, T, K), W (E, K, N))``, every expert on its own rows (Llama 4's experts): one F.linear per expert, stacked."""
    if len(node.args) != 2 or node.kwargs:
        return None
    x, weight_node = node.args
    found = _stacked_weight(gm, weight_node)
    if found is None or not isinstance(x, fx.Node):
        return None
    path, stacked, transposed = found
    if not _claim(gm, path, stacked, transposed):
        return None
    with gm.graph.inserting_before(node):
        outputs = _expert_outputs(gm, path, stacked, transposed, gm.graph.call_function(torch.unbind, (x, 0)))
        joined = gm.graph.call_function(torch.stack, (outputs, 0))
    return _replace(gm, node, joined, weight_node, path)


def _selects_expert(node: fx.Node) -> bool:
    """``F.linear(x, W[e])`` / ``aten.linear(x, aten.select(W, 0, e))`` with ``e`` a constant (JetMoE's experts)."""
    if node.op != "call_function" or node.target not in (F.linear, aten.linear.default) or len(node.args) < 2:
        return False
    return _selected_expert(node.args[1]) is not None


def _selected_expert(weight) -> int | None:
    """e where ``weight`` is ``aten.select(W, 0, e)`` or ``W[e]`` with e an int; else None."""
    if not isinstance(weight, fx.Node) or weight.op != "call_function":
        return None
    if weight.target is aten.select.int and len(weight.args) == 3 and weight.args[1] == 0 and isinstance(weight.args[2], int):
        return weight.args[2]
    if weight.target is operator.getitem and len(weight.args) == 2 and isinstance(weight.args[1], int):
        return weight.args[1]
    return None


def _lower_selected(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Read expert e's weight as its own parameter view: the linear becomes a Linear candidate of its own."""
    select = node.args[1]
    found = _stacked_weight(gm, select.args[0])
    if found is None or found[2]:  # a transposed stack is not what W[e] reads
        return None
    path, stacked, _ = found
    expert = _selected_expert(select)
    if not -stacked.shape[0] <= expert < stacked.shape[0] or not _claim(gm, path, stacked, True):
        return None
    with gm.graph.inserting_before(node):
        weight = _expert_weight(gm, path, stacked, True, expert % stacked.shape[0])
    node.replace_input_with(select, weight)
    if not select.users:
        gm.graph.erase_node(select)
    return path


def _claim(gm: fx.GraphModule, path: str, stacked: torch.Tensor, transposed: bool) -> bool:
    """Record ``path`` as a lowered stack (stored (E, out, in) where ``transposed``), unless its view names are taken."""
    if not _views_free(gm, path, stacked.shape[0]):
        return False
    gm.meta.setdefault(EXPERT_STACKS, {})[path] = transposed
    return True


def _expert_outputs(gm: fx.GraphModule, path: str, stacked: torch.Tensor, transposed: bool, parts: fx.Node) -> list[fx.Node]:
    """Expert e's F.linear on ``parts[e]``, for every expert."""
    return [_expert_linear(gm, path, stacked, transposed, e, gm.graph.call_function(operator.getitem, (parts, e)))
            for e in range(stacked.shape[0])]


def _views_free(gm: fx.GraphModule, path: str, experts: int) -> bool:
    """Whether ``<path>_expert<e>`` names nothing of ``gm`` but this pass's views (a parameter of the model so named
    would be read as expert e's weight): a stack whose names are taken is left as it is, and named in the log."""
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    ours = gm.meta.get(EXPERT_STACKS, {})
    taken = [f"{name}{EXPERT_SUFFIX}{e}" for e in range(experts) if hasattr(owner, f"{name}{EXPERT_SUFFIX}{e}") and path not in ours]
    if taken:
        log.warning("the experts of %r are not lowered: %s names %s already", path, owner_path or "the model", taken[:3])
    return not taken


def _expert_linear(gm: fx.GraphModule, path: str, stacked: torch.Tensor, transposed: bool, expert: int, rows: fx.Node) -> fx.Node:
    """``F.linear(rows, <path>_expert<e>)``, the expert's (out, in) view registered beside the stack once."""
    return gm.graph.call_function(F.linear, (rows, _expert_weight(gm, path, stacked, transposed, expert)))


def _expert_weight(gm: fx.GraphModule, path: str, stacked: torch.Tensor, transposed: bool, expert: int) -> fx.Node:
    """A get_attr of expert e's (out, in) view ``<path>_expert<e>``, registered beside the stack once (no copy)."""
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    view_name = f"{name}{EXPERT_SUFFIX}{expert}"
    if not hasattr(owner, view_name):
        matrix = stacked[expert] if transposed else stacked[expert].T  # the (out, in) Linear weight
        owner.register_parameter(view_name, nn.Parameter(matrix.detach(), requires_grad=stacked.requires_grad))
    return gm.graph.get_attr(f"{owner_path}.{view_name}" if owner_path else view_name)


def _replace(gm: fx.GraphModule, node: fx.Node, joined: fx.Node, weight_node, path: str) -> str:
    joined.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    node.replace_all_uses_with(joined)
    gm.graph.erase_node(node)
    if isinstance(weight_node, fx.Node) and not weight_node.users and weight_node.op == "call_function":
        gm.graph.erase_node(weight_node)
    return path


def _stacked_weight(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor, bool] | None:
    """(parameter path, the stored 3-D tensor, whether the op reads it transposed) for ``W`` or ``W.transpose(-2, -1)``."""
    transposed = False
    if isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose))
        or (node.op == "call_method" and node.target == "transpose")
    ):
        dims = tuple(d % 3 for d in node.args[1:3] if isinstance(d, int))
        if sorted(dims) != [1, 2]:
            return None
        node, transposed = node.args[0], True
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(gm)
    if not isinstance(value, nn.Parameter) or value.dim() != 3 or not value.is_floating_point():  # a weight, no buffer
        return None
    return node.target, value, transposed


def _drop_unread(gm: fx.GraphModule, stacked: set[str]) -> None:
    """Remove the lowered stacked parameters that no node reads any more (their experts' views keep the storage)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in stacked and not node.users:
            gm.graph.erase_node(node)
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for path in stacked - read:
        owner_path, _, name = path.rpartition(".")
        delattr(gm.get_submodule(owner_path), name)
