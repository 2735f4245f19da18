"""Figures for the conv kinds of issue 13: support matrix, compress end to end, ONNX parity.

Prints (1) per kind and method: the largest full-rank error over a few layers with
stride, padding, dilation, groups and output padding, or the refusal's reason; (2) for a
Conv1d audio front end, a Conv3d video net and a ConvTranspose2d decoder at budget 0.5:
FLOPs kept as torch.utils.flop_counter counts them, the full-rank plan's output error,
and the onnxruntime parity of the compressed model exported with fxdecomp.export_onnx.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/conv_kinds_figures.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxdecomp
from fxdecomp.errors import UnsupportedLayerError
from fxdecomp.examples.conv_kinds import end_to_end_cases

METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]


def layers_by_kind() -> dict[str, list[nn.Module]]:
    torch.manual_seed(0)
    return {
        "conv1d": [
            nn.Conv1d(8, 12, 5, stride=2, padding=3, dilation=2, padding_mode="circular"),
            nn.Conv1d(8, 12, 4, padding="same", groups=4, padding_mode="reflect"),
        ],
        "conv3d": [
            nn.Conv3d(8, 12, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1)),
            nn.Conv3d(8, 12, (2, 3, 2), padding="same", groups=2, padding_mode="replicate", bias=False),
        ],
        "conv_transpose1d": [
            nn.ConvTranspose1d(8, 12, 4, stride=3, padding=1, output_padding=2),
            nn.ConvTranspose1d(8, 12, 3, stride=2, padding=2, output_padding=1, groups=4, dilation=2),
        ],
        "conv_transpose2d": [
            nn.ConvTranspose2d(8, 12, (3, 4), stride=(2, 1), padding=(1, 2), output_padding=(1, 0), dilation=(1, 2)),
            nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1, groups=2, bias=False),
        ],
        "conv_transpose3d": [
            nn.ConvTranspose3d(8, 12, 2, stride=2),
            nn.ConvTranspose3d(8, 12, (3, 1, 2), stride=(2, 1, 2), padding=(1, 0, 0), output_padding=(1, 0, 1), groups=2),
        ],
    }


def support_matrix() -> None:
    print("## Full rank, per kind and method (max relative output error over the layers, or the refusal)\n")
    print("| kind | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for kind, layers in layers_by_kind().items():
        cells = []
        for method in METHODS:
            worst, refusals, done = 0.0, set(), 0
            for layer in layers:
                sizes = [d * (k - 1) + 6 + i for i, (k, d) in enumerate(zip(layer.kernel_size, layer.dilation))]
                x = torch.randn(2, layer.in_channels, *sizes)
                try:
                    options = {"tiles": (2, 2)} if method == "tiled_svd" else {}
                    module = fxdecomp.decompose_layer(layer, method, "full", **options)
                except UnsupportedLayerError as exc:
                    refusals.add("groups" if "groups" in str(exc) else "1-d kernel" if "one spatial axis" in str(exc) else str(exc))
                    continue
                with torch.no_grad():
                    ref = layer(x)
                    worst = max(worst, float((module(x) - ref).norm() / ref.norm()))
                done += 1
            cell = f"{worst:.1e} ({done}/{len(layers)})" if done else ""
            if refusals:
                cell = (cell + "; " if done else "") + "refused: " + ", ".join(sorted(refusals))
            cells.append(cell)
        print(f"| {kind} | " + " | ".join(cells) + " |")


def flops(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def end_to_end() -> None:
    print("\n## compress at budget 0.5 (FLOPs by torch.utils.flop_counter), full-rank plan, ONNX parity\n")
    print("| model | FLOPs kept | decisions | full-rank rel. error | ONNX max abs diff (batch 3) |")
    print("|---|---|---|---|---|")
    for name, model, x in end_to_end_cases():
        result = fxdecomp.compress(model, (x,), budget=0.5)
        kept = flops(result.graph_module, x) / flops(model, x)
        layers = dict(model.named_modules())
        plan = {}
        for d in result.decisions:
            method = "svd" if d.op == "linear" else "tucker2"
            plan[d.name] = (method, fxdecomp.decompose_layer(layers[d.name], method, "full").fxdecomp_ranks)
        full = fxdecomp.compress(model, (x,), plan=plan)
        with torch.no_grad():
            ref = model(x)
            error = float((full.graph_module(x) - ref).norm() / ref.norm())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            fxdecomp.export_onnx(result.graph_module, (x,), path)
            batch = torch.randn(3, *x.shape[1:])
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
            with torch.no_grad():
                diff = float(np.abs(got - result.graph_module(batch).numpy()).max())
        decisions = ", ".join(f"{d.name}:{d.method}{list(d.ranks) if d.ranks else ''}" for d in result.decisions)
        print(f"| {name} | {kept:.3f} | {decisions} | {error:.1e} | {diff:.1e} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    support_matrix()
    end_to_end()
