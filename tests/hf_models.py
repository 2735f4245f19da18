"""Moved to `fxdecomp.examples.huggingface`; this module re-exports it for test files that import ``tests.hf_models``."""

from fxdecomp.examples.huggingface import TINY, TinyModel  # noqa: F401
