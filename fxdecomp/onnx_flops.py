"""Moved to `fxdecomp.onnxrt.flops`; this module re-exports its names."""

from .onnxrt.flops import COUNTED_OPS, onnx_flops, onnx_macs_per_node, onnx_params  # noqa: F401
