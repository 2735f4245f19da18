"""Latency packs: the ONNX file of every structure the planner may pick, to be timed on the target device.

``latency_pack(model, example_inputs, "pack/")`` runs the recipe's analyses (the
passes before ``plan``), then, for each candidate layer, writes the layer at each
of its real input shapes and each allowed method's structure at every point of the
plan pass's rank grid (`fxdecomp.planning.grid`, with the grid size the
plan uses when it measures latency), for every rank multiple the target could
reward (the multiple is measured on the device, from the probe convs written too),
plus the whole model. ``manifest.json`` lists one entry per file with the key a
latency table uses (`fxdecomp.onnxrt.table`). The folder also carries
``device_bench.py`` and the two torch-free modules it needs, so that it is all a
device has to receive::

    fxdecomp latency-pack mypkg.models:resnet18 --input-shape 1,3,224,224 --out pack/
    scp -r pack/ device:            # then, on the device (onnxruntime + numpy only):
    python pack/device_bench.py pack/ --out table.json --provider CPUExecutionProvider
    # back here: plan from the table
    fxdecomp.compress(model, x, budget=fxdecomp.Budget(latency=0.6),
                      pipeline=fxdecomp.load_recipe("default").with_options(plan={"latency_table": "table.json"}))

Weights in the files are seeded random numbers (latency does not depend on values);
a pack holds about (grid points x methods x multiples) copies of each layer's size.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import meta
from .budget import Budget
from .compress import _methods, as_example_inputs
from .cost import count_params
from .decomposers import get_decomposer, methods_for
from .errors import FxDecompError, InvalidInputError
from .frontend import capture_with_source
from .onnxrt.files import atomic_write_bytes, atomic_write_text
from .onnxrt.hardware import CANDIDATE_MULTIPLES, multiple_probes
from .onnxrt.layer_cache import build_onnx, canonical, structure_key
from .onnxrt.table import MANIFEST_FORMAT, VERSION, model_key
from .onnxrt.timing import Protocol
from .passes import PassManager, make_pass
from .planning.budget import allowed_methods
from .planning.grid import grid_steps, rank_grid, structure_cost
from .records import PassContext, Request
from .recipes import Recipe, load_recipe

__all__ = ["LatencyPack", "latency_pack"]

# The whole model is timed like `fxdecomp.onnxrt.model_ms` times it: 5 warm-up runs after the first, 20 timed.
MODEL_PROTOCOL = Protocol(warmup=5, runs=20, min_seconds=0.0)
DEVICE_FILES = ("device_bench.py", "timing.py", "files.py")


@dataclass(frozen=True)
class LatencyPack:
    """What `latency_pack` wrote: the folder, its manifest, and how many files of each kind."""

    out_dir: Path
    manifest: Path
    layers: int  # entries for layers and their options
    probes: int  # rank-multiple probe convs
    bytes: int  # size of the ONNX files


def latency_pack(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    exclude: Sequence[str] | str = (),
    pipeline: str | os.PathLike | Recipe | None = None,
    frontend: str = "auto",
) -> LatencyPack:
    """Write the latency pack of ``model`` at ``example_inputs`` into ``out_dir`` (created; must be empty or absent).

    ``methods``, ``exclude`` and ``pipeline`` as in `fxdecomp.compress`: plan from the
    table with the same ones. Raises InvalidInputError if ``out_dir`` holds files.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"{str(out)!r} exists and is not an empty folder; give a new folder for the pack")
    example_inputs = as_example_inputs(example_inputs)
    recipe = load_recipe(pipeline)
    steps = [s.name for s in recipe.steps]
    if "plan" not in steps:
        raise InvalidInputError(f"recipe {recipe.name!r} has no plan pass: nothing to pack")
    with torch.no_grad():
        gm, _, source = capture_with_source(model, example_inputs, frontend)
        request = Request(
            example_inputs=example_inputs,
            budget=Budget(latency=1.0),  # the grid the plan uses when it measures latency
            methods=_methods(methods if methods is not None else recipe.methods),
            exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude),
        )
        context = PassContext(request, reference=copy.deepcopy(gm), source_model=source)
        before_plan = recipe.steps[: steps.index("plan")]
        PassManager.from_steps(((s.name, s.options) for s in before_plan), context, f"recipe {recipe.name!r}")(gm)
        plan = make_pass("plan", context, recipe.steps[steps.index("plan")].options)
    requests = _requests(context, plan)
    return _write(out, requests, context, recipe.name)


def _requests(context: PassContext, plan) -> dict[str, tuple]:
    """canonical key -> (spec, shape, method, ranks, layer names) of every structure the plan may time."""
    requests: dict[str, tuple] = {}

    def add(name, spec, shape, method=None, ranks=()):
        key = canonical(structure_key(spec, shape, method, ranks, {}))
        if key in requests:
            requests[key][4].append(name)
        else:
            requests[key] = (spec, tuple(shape), method, tuple(ranks), [name])

    methods = allowed_methods(context.methods)
    for candidate in context.candidates.values():
        shapes = [site.input_shape for site in candidate.sites]
        for shape in shapes:  # every layer's own time, excluded ones too: the plan sets options against it
            add(candidate.name, candidate.spec, shape)
        if candidate.excluded:
            continue
        flops = sum(site.node.meta[meta.FLOPS].flops for site in candidate.sites)
        params = count_params(candidate.layer)
        for method in methods:
            if method not in methods_for(candidate.kind):
                continue
            decomposer = get_decomposer(candidate.kind, method)
            try:
                decomposer.check(candidate.spec)
            except FxDecompError:
                continue
            for multiple in sorted({max(plan.options.round_to, m) for m in CANDIDATE_MULTIPLES}):
                steps = grid_steps(plan.options, method, sensitivity=False, measures_latency=True)
                adaptive = (False, True) if plan.options.round_to == 0 else (False,)  # round_to 0 adapts to small bonds
                grids = [rank_grid(decomposer.planning_max_ranks(candidate.spec), steps, multiple, a) for a in adaptive]
                for ranks in dict.fromkeys(r for grid in grids for r in grid):
                    option_flops, option_params = structure_cost(decomposer, candidate, ranks)
                    if option_flops >= flops and option_params >= params:
                        continue  # the plan never times an option cheaper in neither
                    for shape in shapes:
                        add(candidate.name, candidate.spec, shape, method, ranks)
    return requests


def _write(out: Path, requests: dict[str, tuple], context: PassContext, recipe: str) -> LatencyPack:
    from .export import export_onnx

    (out / "layers").mkdir(parents=True, exist_ok=True)
    entries, total = [], 0
    probes = {canonical(structure_key(spec, shape, None, (), {})): (spec, shape) for _, spec, shape in multiple_probes()}
    for key, (spec, shape) in probes.items():
        requests.setdefault(key, (spec, shape, None, (), ["(rank-multiple probe)"]))
    for index, (key, (spec, shape, method, ranks, names)) in enumerate(requests.items()):
        payload, builder = build_onnx(spec, shape, method, ranks)
        file = f"layers/{index:05d}.onnx"
        atomic_write_bytes(out / file, payload)
        total += len(payload)
        what = {"layers": names, "method": method or "original", "ranks": list(ranks), "input": list(shape), "builder": builder}
        entries.append({"key": key, "file": file, "what": what})
    shapes = [tuple(x.shape) for x in context.example_inputs]
    export_onnx(context.reference, context.example_inputs, out / "model.onnx", check=False, dynamic_batch=False)
    total += (out / "model.onnx").stat().st_size
    entries.append(
        {"key": model_key(shapes), "file": "model.onnx", "what": {"model": True, "inputs": [list(s) for s in shapes]}, "protocol": MODEL_PROTOCOL.to_dict()}
    )
    here = Path(__file__).resolve().parent / "onnxrt"
    for name in DEVICE_FILES:
        shutil.copyfile(here / name, out / name)
    from . import __version__

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": VERSION,
        "fxdecomp": __version__,
        "recipe": recipe,
        "protocol": Protocol().to_dict(),
        "entries": entries,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return LatencyPack(out, out / "manifest.json", len(entries) - len(probes) - 1, len(probes), total)
