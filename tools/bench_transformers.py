"""Compress tiny transformers models (random weights) and check what the issue asks of the results.

For each model and budget: `fxdecomp.compress` (torch.export capture, free batch and
sequence dims), the FLOPs kept counted independently with torch.utils.flop_counter
(aten level, 2 FLOPs per multiply-add, result graph / original model at the example
shape), ONNX export with onnxruntime parity (max |onnx - torch|) at the example shape
and at a second shape with every free dimension changed, and the seconds each took.

Usage::

    OMP_NUM_THREADS=1 python tools/bench_transformers.py                       # all five models, budgets 0.75 and 0.5
    OMP_NUM_THREADS=1 python tools/bench_transformers.py --models gpt2 llama --budgets 0.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxdecomp  # noqa: E402
from fxdecomp.examples.huggingface import TINY  # noqa: E402  (the tiny configs the tests use)

EXAMPLE = (2, 8)  # (batch, sequence length) compressed at
EXCLUDE = {
    "vit": ["embeddings.patch_embeddings.projection"],
    "whisper_encoder": ["conv1", "conv2"],  # WhisperEncoder reads conv1.stride and conv2.stride in its forward
}  # as the tests: keep-the-model mode needs it


def flops(module: torch.nn.Module, inputs: tuple) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def first(out) -> torch.Tensor:
    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def parity(path: Path, module: torch.nn.Module, inputs: tuple) -> float:
    """max |onnxruntime - torch| of the first output at ``inputs``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = first(module(*inputs)).numpy()
    return float(np.abs(got - want).max())


def row(name: str, budget: float, scratch: Path) -> str:
    spec = TINY[name]
    model, x = spec.build(), spec.inputs(*EXAMPLE)
    start = time.perf_counter()
    result = fxdecomp.compress(model, x, budget=budget, exclude=EXCLUDE.get(name, ()))
    compress_s = time.perf_counter() - start
    kept = flops(result.graph_module, x) / flops(model, x)
    path = scratch / f"{name}_{budget}.onnx"
    start = time.perf_counter()
    report = fxdecomp.export_onnx(result.graph_module, x, path)
    onnx_s = time.perf_counter() - start
    cells = []
    for shape in report.checked_shapes:
        inputs = tuple(spec.inputs(s[0], s[1] if len(s) > 1 else 0)[k] for k, s in enumerate(shape))
        assert tuple(tuple(t.shape) for t in inputs) == shape, (shape, [t.shape for t in inputs])
        cells.append(f"{'x'.join(map(str, shape[0]))}: {parity(path, result.graph_module, inputs):.1e}")
    return (
        f"| {name} | {budget} | {result.flops_ratio:.3f} | {kept:.3f} | {'; '.join(cells)} | "
        f"{compress_s:.1f} | {onnx_s:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TINY), choices=list(TINY))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(f"Tiny transformers models, compressed at (batch, sequence) = {EXAMPLE}; torch {torch.__version__}")
    print("FLOPs = 2 x multiply-adds. 'fxdecomp' is the result's own count; 'flop_counter' is")
    print("torch.utils.flop_counter on the result graph / on the original model (independent).")
    print("ONNX parity: max |onnxruntime - torch| of the first output at each checked input shape.\n")
    print("| model | budget | FLOPs kept (fxdecomp) | FLOPs kept (flop_counter) | ONNX parity per input shape | compress s | ONNX export + checks s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            for budget in args.budgets:
                print(row(name, budget, Path(scratch)), flush=True)


if __name__ == "__main__":
    main()
