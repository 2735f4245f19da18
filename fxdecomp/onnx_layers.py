"""Moved to `fxdecomp.onnxrt.layers`; this module re-exports its names."""

from .onnxrt.layers import OPSET, module_to_onnx  # noqa: F401
