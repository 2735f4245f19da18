"""Partial capture at full rank, part by part: is an output difference the rewrite or the model's post-processing?

Compresses torchvision's Faster R-CNN (random weights, eval mode; partial capture: the
detector cannot be captured whole) with every Conv2d/Linear decomposed by svd at its
maximum rank, then, on one image, compares each captured part's outputs between the
original and the result, on the inputs that part received in the ORIGINAL model (the
rewrite alone), and the final detections. Two decisive controls:

* the result with the box predictor's outputs replaced by the original's: 0 means
  everything outside the captured parts (RPN proposals, ROI pooling, NMS, top-k) is the same;
* the original with 1e-7 relative noise on the box predictor's weights: an error of the
  same size as the result's means the detections amplify float rounding (NMS and top-k on
  near-tied random scores), not a fault of the rewrite.

In float64 the parts must agree to ~1e-14. Needs torchvision: run it in the separate venv::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 /work/venv-vision/bin/python tools/partial_parity.py --size 128
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 /work/venv-vision/bin/python tools/partial_parity.py --size 128 --dtype float64

(~30 s each on one core.)
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxdecomp  # noqa: E402


def tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def relative_error(expected, actual) -> float:
    expected, actual = tensors(expected), tensors(actual)
    if len(expected) != len(actual) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return float("nan")
    errors = [float((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)) for a, e in zip(actual, expected) if e.is_floating_point()]
    return max(errors, default=0.0)


def full_rank_plan(model: nn.Module) -> dict:
    """Every Conv2d/Linear by svd at its maximum rank (the rewrite alone: the result must equal the model)."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            plan[name] = ("svd", (min(module.weight.shape),))
        elif isinstance(module, nn.Conv2d):
            plan[name] = ("svd", (min(module.out_channels // module.groups, module.weight[0].numel()),))
    return plan


def run(model: nn.Module, image: torch.Tensor, parts: list[str], replace: dict | None = None):
    """(inputs per part, outputs per part, the model's output); ``replace`` substitutes a part's outputs."""
    inputs, outputs, handles = {}, {}, []
    for name in parts:
        module = model.get_submodule(name)

        def pre(_module, args, kwargs, name=name):
            inputs.setdefault(name, copy.deepcopy((args, kwargs)))

        def post(_module, _args, output, name=name):
            outputs.setdefault(name, output)
            return replace.get(name) if replace else None

        handles += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            result = model(image.clone())
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image side (pixels); also min_size/max_size")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torchvision

    logging.disable(logging.WARNING)  # torch.export's failure logs on the uncapturable parts
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = torchvision.models.get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None, num_classes=5,
        min_size=args.size, max_size=args.size,
    ).eval().to(dtype)
    image = torch.randn(1, 3, args.size, args.size, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxdecomp.compress(model, (image.clone(),), plan=full_rank_plan(model), progress=False)
    compressed = result.graph_module
    parts = [c.name for c in result.captured]
    print(f"{args.dtype}, 1x3x{args.size}x{args.size}; captured {[(c.name, c.frontend) for c in result.captured]}; "
          f"{sum(d.decomposed for d in result.decisions)} layers decomposed at full rank")
    inputs, expected, want = run(model, image, parts)
    _, actual, got = run(compressed, image, parts)
    print("| part | output error in the pipeline | output error on the original's inputs |")
    print("|---|---|---|")
    for name in parts:
        args_, kwargs = copy.deepcopy(inputs[name])
        with torch.no_grad():
            alone = compressed.get_submodule(name)(*args_, **kwargs)
        print(f"| {name} | {relative_error(expected[name], actual[name]):.2e} | {relative_error(expected[name], alone):.2e} |")
    print(f"final detections: {relative_error(want, got):.3e} (boxes), output_error {result.output_error:.3e}")
    last = parts[-1]
    _, _, swapped = run(compressed, image, parts, replace={last: expected[last]})
    print(f"control 1: result with the original's {last} outputs -> detections error {relative_error(want, swapped):.3e}")
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in noisy.get_submodule(last).parameters():
            parameter.mul_(1 + 1e-7 * torch.randn_like(parameter))
    _, perturbed, noisy_out = run(noisy, image, parts)
    print(f"control 2: original with 1e-7 noise on {last}'s weights: its outputs {relative_error(expected[last], perturbed[last]):.2e}, "
          f"detections error {relative_error(want, noisy_out):.3e}")


if __name__ == "__main__":
    main()
