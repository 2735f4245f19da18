"""A direct ONNX builder for single layers and decomposed structures: milliseconds, not an exporter run.

`fxdecomp.onnxrt.layer_cache` times hundreds of small graphs; torch.onnx's exporter costs about
a second each. The structures the decomposers build are made of a few standard
layers, which this module writes straight into an ONNX graph with the ops the
exporter itself emits for them (checked in the tests):

- ``nn.Conv2d`` -> ``Conv`` (explicit pads; a non-zero ``padding_mode`` -> ``Pad`` then ``Conv``)
- ``nn.ZeroPad2d`` -> folded into the next ``Conv``'s pads (as the exporter does);
  ``ReflectionPad2d`` / ``ReplicationPad2d`` / ``CircularPad2d`` -> ``Pad`` reflect / edge / wrap
- ``nn.ChannelShuffle`` -> ``Reshape``, ``Transpose``, ``Reshape``
- ``nn.Linear`` -> ``Gemm`` on 2-D inputs, ``MatMul`` + ``Add`` otherwise
- `TTLinear`, `TiledLinear` -> the ``Reshape`` / ``Transpose`` / ``MatMul`` chain of their forward

Shapes are static. Weights are the module's own (``weights="module"``) or seeded
random numbers of a sensible scale (``weights="random"``, for a module built under
``torch.device("meta")``: latency does not depend on the values).

Example::

    from fxdecomp.onnxrt.layers import module_to_onnx
    model = module_to_onnx(nn.Sequential(nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 3, padding=1)), (1, 64, 56, 56))
    onnxruntime.InferenceSession(model.SerializeToString())
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import UnsupportedLayerError
from ..layers import TiledLinear, TTLinear

__all__ = ["OPSET", "module_to_onnx"]

OPSET = 19  # Pad mode "wrap" (circular padding) needs opset 19
_PAD_MODES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "edge", nn.CircularPad2d: "wrap"}
_CONV_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class _Graph:
    """Nodes and initializers under construction; every value carries its static shape."""

    def __init__(self, weights: str, seed: int):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.weights = weights
        self.rng = np.random.default_rng(seed)
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def constant(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.shapes[name] = tuple(array.shape)
        return name

    def weight(self, tensor: torch.Tensor, fan_in: int, prefix: str) -> str:
        """A parameter as an initializer: its values, or random ones when weights="random"."""
        if self.weights == "random":
            # Timing needs only sane values, not fresh ones: a repeated random block is 10x faster for big layers.
            size = math.prod(tensor.shape)
            block = self.rng.standard_normal(min(size, 1 << 16), dtype=np.float32) / np.float32(math.sqrt(max(fan_in, 1)))
            array = np.resize(block, tuple(tensor.shape))
        else:
            array = tensor.detach().to("cpu", torch.float32).numpy()
        return self.constant(array, prefix)

    def op(self, op_type: str, inputs: Sequence[str], shape: Sequence[int], **attrs) -> str:
        out = self._name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        self.shapes[out] = tuple(int(d) for d in shape)
        return out

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        """Reshape with at most one -1, resolved here so every shape stays static."""
        shape = list(shape)
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape[shape.index(-1)] = math.prod(self.shapes[x]) // known
        if math.prod(shape) != math.prod(self.shapes[x]):
            raise ValueError(f"cannot reshape {self.shapes[x]} to {shape}")
        return self.op("Reshape", [x, self.constant(np.array(shape, dtype=np.int64), "shape")], shape)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", [x], [self.shapes[x][p] for p in perm], perm=list(perm))

    def matmul(self, a: str, b: str) -> str:
        sa, sb = self.shapes[a], self.shapes[b]
        batch = np.broadcast_shapes(sa[:-2], sb[:-2])
        return self.op("MatMul", [a, b], (*batch, sa[-2], sb[-1]))

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b], np.broadcast_shapes(self.shapes[a], self.shapes[b]))

    def pad(self, x: str, pads: Sequence[int], mode: str) -> str:
        """Pad the last two dims by ``pads`` = (left, right, top, bottom), torch's order."""
        left, right, top, bottom = pads
        n, c, h, w = self.shapes[x]
        onnx_pads = np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)
        return self.op("Pad", [x, self.constant(onnx_pads, "pads")], (n, c, h + top + bottom, w + left + right), mode=mode)


def module_to_onnx(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    weights: str = "module",
    seed: int = 0,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """The ONNX model of ``module`` (a supported layer or a Sequential of them) at a static ``input_shape``.

    Input ``x``, output ``y``, float32. ``weights="random"`` fills every parameter with
    seeded random values (the module may then live on the meta device). Raises
    UnsupportedLayerError for a layer this builder does not know.
    """
    if weights not in ("module", "random"):
        raise ValueError(f"weights must be 'module' or 'random', got {weights!r}")
    graph = _Graph(weights, seed)
    shape = tuple(int(d) for d in input_shape)
    graph.shapes["x"] = shape
    layers = _leaves(module)
    value, pending = "x", None  # pending: zero padding waiting to fold into the next conv
    for layer in layers:
        if isinstance(layer, nn.ZeroPad2d):
            pads = tuple(int(p) for p in layer.padding)
            pending = pads if pending is None else tuple(a + b for a, b in zip(pending, pads))
            continue
        if pending is not None and not isinstance(layer, nn.Conv2d):
            value, pending = graph.pad(value, pending, "constant"), None
        if isinstance(layer, nn.Conv2d):
            value, pending = _conv(graph, layer, value, pending), None
        elif type(layer) in _PAD_MODES:
            value = graph.pad(value, tuple(int(p) for p in layer.padding), _PAD_MODES[type(layer)])
        elif isinstance(layer, nn.ChannelShuffle):
            value = _channel_shuffle(graph, layer, value)
        elif isinstance(layer, nn.Linear):
            value = _linear(graph, layer, value)
        elif isinstance(layer, TTLinear):
            value = _tt_linear(graph, layer, value)
        elif isinstance(layer, TiledLinear):
            value = _tiled_linear(graph, layer, value)
        elif isinstance(layer, nn.Identity):
            pass
        else:
            raise UnsupportedLayerError(f"module_to_onnx does not know {type(layer).__name__}; export it with fxdecomp.export_onnx")
    if pending is not None:
        value = graph.pad(value, pending, "constant")
    if value == "x":
        value = graph.op("Identity", ["x"], shape)
    graph.nodes[-1].output[0] = "y"
    out_shape = graph.shapes[value]
    onnx_graph = helper.make_graph(
        graph.nodes,
        "fxdecomp_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        graph.initializers,
    )
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fxdecomp")
    model.ir_version = min(model.ir_version, 9)  # onnxruntime 1.18+ reads IR 9
    return model


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _conv(graph: _Graph, conv: nn.Conv2d, x: str, extra: tuple[int, int, int, int] | None) -> str:
    if type(conv).forward is not nn.Conv2d.forward:
        raise UnsupportedLayerError(f"module_to_onnx: {type(conv).__name__} overrides forward; export it instead")
    if isinstance(conv.padding, str):
        pads = tuple(int(p) for p in conv._reversed_padding_repeated_twice)  # left, right, top, bottom
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    if conv.padding_mode != "zeros" and any(pads):
        if extra is not None:
            x = graph.pad(x, extra, "constant")
        x, pads, extra = graph.pad(x, pads, _CONV_PAD_MODES[conv.padding_mode]), (0, 0, 0, 0), None
    if extra is not None:
        pads = tuple(a + b for a, b in zip(pads, extra))
    left, right, top, bottom = pads
    n, c, h, w = graph.shapes[x]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out = (n, conv.out_channels, (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1)
    fan_in = conv.in_channels // conv.groups * kh * kw
    inputs = [x, graph.weight(conv.weight, fan_in, "W")]
    if conv.bias is not None:
        inputs.append(graph.weight(conv.bias, fan_in, "B"))
    return graph.op(
        "Conv",
        inputs,
        out,
        kernel_shape=[kh, kw],
        strides=[sh, sw],
        dilations=[dh, dw],
        group=conv.groups,
        pads=[top, left, bottom, right],
    )


def _channel_shuffle(graph: _Graph, layer: nn.ChannelShuffle, x: str) -> str:
    n, c, h, w = graph.shapes[x]
    g = layer.groups
    y = graph.reshape(x, (n, g, c // g, h, w))
    y = graph.transpose(y, (0, 2, 1, 3, 4))
    return graph.reshape(y, (n, c, h, w))


def _linear(graph: _Graph, layer: nn.Linear, x: str) -> str:
    shape = graph.shapes[x]
    fan_in = layer.in_features
    if len(shape) == 2:
        inputs = [x, graph.weight(layer.weight, fan_in, "W")]
        if layer.bias is not None:
            inputs.append(graph.weight(layer.bias, fan_in, "B"))
        return graph.op("Gemm", inputs, (shape[0], layer.out_features), transB=1)
    y = graph.matmul(x, graph.weight(layer.weight.T, fan_in, "W"))
    return graph.add(y, graph.weight(layer.bias, fan_in, "B")) if layer.bias is not None else y


def _tt_linear(graph: _Graph, layer: TTLinear, x: str) -> str:
    """TTLinear.forward, op for op."""
    lead = graph.shapes[x][:-1]
    n, m = layer.in_modes[::-1], layer.out_modes[::-1]
    t = graph.reshape(x, (-1, layer.in_features // n[0], n[0], 1))
    done = 1
    for k, core in enumerate(layer.cores):
        fan_in = core.shape[0]
        u = graph.matmul(graph.transpose(t, (0, 1, 3, 2)), graph.weight(core, fan_in, "core"))
        next_n = n[k + 1] if k + 1 < len(n) else 1
        u = graph.reshape(u, (graph.shapes[u][0], -1, next_n, done, layer.bonds[k + 1], m[k]))
        done *= m[k]
        u_shape = graph.shapes[u]
        t = graph.reshape(graph.transpose(u, (0, 1, 2, 4, 5, 3)), (u_shape[0], u_shape[1], next_n * layer.bonds[k + 1], done))
    y = graph.reshape(t, (*lead, layer.out_features))
    return graph.add(y, graph.weight(layer.bias, layer.in_features, "B")) if layer.bias is not None else y


def _tiled_linear(graph: _Graph, layer: TiledLinear, x: str) -> str:
    """TiledLinear.forward, op for op."""
    lead = graph.shapes[x][:-1]
    rows, cols = layer.tiles
    z = graph.reshape(x, (-1, cols, 1, layer.in_features // cols))
    z = graph.matmul(z, graph.weight(layer.right, layer.in_features // cols, "right"))
    z = graph.transpose(graph.reshape(z, (-1, cols, rows, layer.rank)), (0, 2, 1, 3))
    z = graph.reshape(z, (-1, rows, 1, cols * layer.rank))
    y = graph.matmul(z, graph.weight(layer.left, cols * layer.rank, "left"))
    y = graph.reshape(y, (*lead, layer.out_features))
    return graph.add(y, graph.weight(layer.bias, layer.in_features, "B")) if layer.bias is not None else y
