"""Small example models and weights shared by the tests, the tools and the docs (random weights, seeded).

They live in the package, not in ``tests/``, so that the test suite (run against an installed
wheel with ``PYTHONSAFEPATH=1``), the sdist's self-test and every script in ``tools/`` import
the same definitions without putting a checkout folder on ``sys.path``.

`vision` (VGG, ResNet, MobileNetV2-ish, ViT, functional calls, a shared layer), `conv_kinds`
(Conv1d / Conv3d / ConvTranspose2d models), `graphs` (issue 13's graphs: side effects,
functional weights, a tied head, attention), `huggingface` (tiny transformers configs, built
on demand), `kernels` (trained-like conv kernels).

Example::

    from fxdecomp.examples.vision import VGG
    from fxdecomp.examples.huggingface import TINY
"""
