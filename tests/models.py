"""Moved to `fxdecomp.examples.vision`; this module re-exports it for test files that import ``tests.models``."""

from fxdecomp.examples.vision import (  # noqa: F401
    VGG,
    Attention,
    BasicBlock,
    Functional,
    InvertedResidual,
    MobileNetV2ish,
    ResNet,
    SharedLayer,
    ViT,
    image_models,
)
