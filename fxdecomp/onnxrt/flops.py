"""FLOPs and parameters of an ONNX file, counted from its graph the way `fxdecomp.count_flops` counts torch.

Only the ops that dominate CNNs and MLPs are counted: Conv, ConvTranspose, Gemm and
MatMul, at one multiply-add = 2 FLOPs (bias additions, norms and elementwise ops count
zero). On a model made of Conv2d / Linear / matmul the count equals
`fxdecomp.count_flops` of the torch model it was exported from.

Example::

    from fxdecomp.onnxrt.flops import onnx_flops, onnx_params
    onnx_flops("model.onnx", (torch.randn(1, 3, 224, 224),))   # 2 x MACs, at that batch size
    onnx_params("model.onnx")                                  # elements of float initializers
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, shape_inference

from ..cost import FLOPS_PER_MAC
from ..errors import InvalidInputError

__all__ = ["onnx_flops", "onnx_macs_per_node", "onnx_params"]

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def onnx_flops(path: str | os.PathLike, example_inputs: Sequence[torch.Tensor | np.ndarray] | torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one run of the model at ``path`` on inputs of these shapes."""
    return FLOPS_PER_MAC * sum(onnx_macs_per_node(path, example_inputs).values())


def onnx_macs_per_node(
    path: str | os.PathLike, example_inputs: Sequence[torch.Tensor | np.ndarray] | torch.Tensor
) -> dict[str, int]:
    """Multiply-adds of each counted node (Conv, ConvTranspose, Gemm, MatMul), by node name."""
    model = _inferred(_load(path), _shapes(example_inputs))
    shapes = _known_shapes(model)
    macs: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in COUNTED_OPS:
            continue
        needed = [node.input[0], node.input[1], node.output[0]]
        missing = [n for n in needed if n not in shapes]
        if missing:
            raise InvalidInputError(
                f"ONNX shape inference could not find the shape of {missing} (inputs of {node.op_type} node "
                f"{node.name or index!r}); the graph computes shapes that onnx.shape_inference cannot follow"
            )
        x, w, y = (shapes[n] for n in needed)
        macs[node.name or f"{node.op_type}_{index}"] = _node_macs(node, x, w, y)
    return macs


def onnx_params(path: str | os.PathLike) -> int:
    """Elements of the floating-point initializers (the weights; shape constants are not counted)."""
    model = _load(path)
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)


def _node_macs(node, x: tuple[int, ...], w: tuple[int, ...], y: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        # every output element is a dot product over (C_in / groups) x kernel
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        # every input element is scattered into (C_out / groups) x kernel outputs; W is (C_in, C_out/g, k...)
        return math.prod(x) * math.prod(w[1:])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        inner = x[0] if trans_a else x[1]
        return math.prod(y) * inner
    # MatMul, numpy semantics: each output element is a dot product over A's last dim (its only one if 1-D)
    return math.prod(y) * x[-1]


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise InvalidInputError(f"no ONNX model at {str(path)!r}")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidInputError(f"cannot read {str(path)!r} as an ONNX model: {exc}") from exc


def _shapes(example_inputs) -> list[tuple[int, ...]]:
    items = [example_inputs] if isinstance(example_inputs, (torch.Tensor, np.ndarray)) else list(example_inputs)
    shapes = []
    for i, item in enumerate(items):
        if not isinstance(item, (torch.Tensor, np.ndarray)):
            raise InvalidInputError(f"example input {i} is a {type(item).__name__}; give tensors or numpy arrays")
        shapes.append(tuple(int(d) for d in item.shape))
    return shapes


def _inferred(model: onnx.ModelProto, input_shapes: list[tuple[int, ...]]) -> onnx.ModelProto:
    """The model with concrete input shapes and every intermediate shape inferred anew."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != len(input_shapes):
        raise InvalidInputError(f"the ONNX model takes {len(inputs)} input(s), got {len(input_shapes)} example input(s)")
    graph = model.graph
    for value, shape in zip(inputs, input_shapes):
        elem_type = value.type.tensor_type.elem_type
        value.CopyFrom(helper.make_tensor_value_info(value.name, elem_type, list(shape)))
    # Stale value_info holds the symbolic batch; drop it so inference writes concrete dims.
    del graph.value_info[:]
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise InvalidInputError(f"ONNX shape inference failed on these input shapes {input_shapes}: {exc}") from exc


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes
