"""Large models, one block at a time: plan globally on streamed statistics, then compress block by block.

For a model whose bulk is a stack of blocks (the decoder layers of a causal LM,
the encoder layers of an encoder), `compress_sequential` never holds more than
one block's working set beyond what it was given:

1. **Statistics** (first streaming pass): the example batch and the calibration
   batches run through the original blocks one at a time; for every Linear in a
   block, its FLOPs on the example batch, the Gram matrix of its inputs on the
   calibration batches (`fxdecomp.calibration.GramAccumulator`; layers that read
   the same tensor share one), and from them the options of the plan: ranks on
   the planner's grid with their cost and predicted error. The factorizations are
   dropped once the options are known.
2. **Plan**: one multiple-choice knapsack over every layer of every block
   (`fxdecomp.planning.solver.solve_mckp`), under the budget of the whole model's FLOPs
   (or of the candidate layers' FLOPs, ``scope="layers"``).
3. **Apply** (second streaming pass): each block is calibrated on the outputs of
   the already compressed blocks before it, so that its factors see, and absorb,
   the error that reaches them (the sequential scheme of GPTQ and SVD-LLM);
   factorized at the planned ranks, its Linear modules replaced by the
   decomposed ones, written out, freed.

Without calibration both passes are weight-only, and the plan equals the one
`fxdecomp.compress` makes with the ``flops`` recipe (the plain FLOP plan, the
same on every machine) on the same example inputs: a large model's plan does
not depend on the CPU that makes it, and its Linear layers are not repaired
toward onnxruntime latency as the default recipe's are.
With a `LazyCheckpoint` as the source, weights are read per block from the
safetensors shards and the compressed model is written as shards plus the plan
(`ShardWriter`), loadable with `load_compressed`. Calibration uses the input
side only (output-side statistics would need the later blocks).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..budget import Budget
from ..calibration import GramAccumulator
from ..cost import flop_counter
from ..errors import BudgetError, InvalidInputError
from .. import kept_record
from ..keep_model import rebuild_kept
from ..capture.experts import stacked_weights
from ..kept_experts import is_kept_expert
from ..kept_layer import FactoredWeightOwner, KeptLayer
from ..kept_record import RECORD_KEY, KeptEntry
from ..progress import Progress
from ..result import Decision
from .blocks import BlockCall, BlockStack, capture_block_inputs, head_inputs, run_block
from .checkpoint import LazyCheckpoint, ShardWriter, empty_model
from .distributed import World, default_device
from .experts import close_stacks, expand, expert_layers, install_expert, open_stacks, stacked_experts, tie
from .loading import PLAN_FILE, load_compressed  # noqa: F401  (load_compressed: importable from here as before)
from .layers import (
    LayerRecord, apply_option, factorization_cost, hooked_linears, layer_record, linear_spec, linears, observe, solve,
)
from ..grad_mode import outside_inference_mode
from ..graph.hooks import kept_for_hooks
from ..user_warnings import warn



@dataclass
class SequentialResult:
    """What `compress_sequential` returns. FLOPs count 2 per multiply-add; parameters and bytes count tied tensors once."""

    model: nn.Module | None  # the compressed model in its own class (None when it was written to disk only)
    decisions: list[Decision]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    output_dir: str | None = None

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("model", "decisions")}
        data["decisions"] = [asdict(d) for d in self.decisions]
        return data


@outside_inference_mode
def compress_sequential(
    source: nn.Module | LazyCheckpoint | str | Path,
    example_inputs: tuple,
    budget: float | Budget = 0.8,
    calibration: Iterable[tuple] | None = None,
    *,
    out: str | Path | None = None,
    exclude: Sequence[str] = (),
    scope: str = "model",
    grid: int = 24,
    shard_bytes: int = 1 << 30,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> SequentialResult:
    """Compress the Linear layers (and transformers ``Conv1D``, GPT-2's) of a stack-of-blocks model one block at a
    time (see the module doc), and the stacked experts of its mixtures of experts, each expert a Linear
    ``<stack>_expert<e>`` and the experts of a stack tied to one option (`fxdecomp.large.experts`).

    ``source`` is a model in memory (never modified; the result is a compressed
    copy, so peak memory is about twice the model), or a Hugging Face model
    directory / `LazyCheckpoint` read lazily (then ``out`` is required, the result
    is written there, and peak memory is the modules outside the blocks and one
    block's working set: shards go to disk tensor by tensor). ``example_inputs`` is one batch (a tuple of tensors) on
    which FLOPs are counted; ``calibration`` an iterable of such batches. ``budget``
    is a fraction of the FLOPs of the whole model (``scope="model"``, as in
    `fxdecomp.compress`) or of its candidate Linear layers (``scope="layers"``).
    ``out`` also receives safetensors shards (of at most ``shard_bytes``) and the plan in memory mode.
    ``device`` is where blocks run and are factorized (e.g. "cuda"; default: this process's GPU
    under an NCCL process group, see `init_from_environment`, else the CPU); the weights are read
    to and written from the CPU, and the returned model (memory mode) is on ``device``.

    Raises `BudgetError` for an unreachable budget (with the smallest reachable
    fraction), `InvalidInputError` for a model without a stack of blocks,
    batches that do not run, or a bad scope.
    """
    start = time.perf_counter()
    budget = Budget.parse(budget)
    if budget.metric != "flops":
        raise BudgetError("compress_sequential plans FLOP budgets; give a float or Budget(flops=...)")
    if scope not in ("model", "layers"):
        raise InvalidInputError(f"scope must be 'model' or 'layers', got {scope!r}")
    checkpoint = LazyCheckpoint(source) if isinstance(source, (str, Path)) else source
    lazy = isinstance(checkpoint, LazyCheckpoint)
    if lazy and out is None:
        raise InvalidInputError("compressing a checkpoint directory writes the result to disk: give out=DIR")
    device = torch.device(device) if device is not None else default_device()
    model = empty_model(checkpoint) if lazy else copy.deepcopy(source).eval()
    previous = getattr(kept_record.config_of(model), RECORD_KEY, None)
    if lazy and previous:  # a compressed checkpoint compressed again: its decomposed layers as they were saved
        rebuild_kept(model, previous)
    stack = BlockStack.of(model)
    if lazy:
        checkpoint.materialize(model, skip=stack.path)
    params_before, bytes_before = checkpoint.sizes() if lazy else _sizes(model)
    place(model, device, skip=stack.path if lazy else None)
    example = place(tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,), device)
    batches = [place(tuple(b) if isinstance(b, (tuple, list)) else (b,), device) for b in calibration] if calibration is not None else []
    world = World.current()
    if batches and len(batches) < world.size:
        raise InvalidInputError(f"{len(batches)} calibration batches for {world.size} processes: give at least one per process")
    batches = world.share(batches)
    tied = _tied_parameters(model)
    _warn_stacked(model)
    if hooked := hooked_linears(model):
        warn(kept_for_hooks(hooked, "compress_sequential"))
    head_layers = [(n, m) for n, m in linears(model, "", exclude) if not n.startswith(stack.path + ".")]

    def load(index: int) -> nn.Module:
        block = stack.blocks[index]
        if lazy:
            checkpoint.materialize(block, stack.name(index))
            place(block, device)
        return block

    def unload(block: nn.Module) -> None:
        if lazy:
            checkpoint.release(block)
            checkpoint.close()
        release_freed_memory()

    # 1. Statistics on the original blocks.
    records: list[LayerRecord] = []
    stack_of: dict[str, str] = {}  # an opened expert's name -> its stack's (fxdecomp.large.experts)
    unused: list[str] = []
    with flop_counter() as counter:
        example_call = capture_block_inputs(model, stack, [example])[0]
    flops = counter.get_total_flops()
    calls = capture_block_inputs(model, stack, batches) if batches else []
    tuple_output = False
    with Progress("statistics of block", len(stack.blocks), progress) as report:
        for index in range(len(stack.blocks)):
            report.step(stack.name(index))
            block = load(index)
            opened = open_stacks(block, stack.name(index))
            layers = linears(block, stack.name(index), exclude)
            experts = expert_layers(opened, exclude)
            shapes: dict = {}
            with flop_counter() as counter, observe(layers + experts, shapes=shapes), torch.no_grad():
                output = block(*example_call.args, **example_call.kwargs)
            flops += counter.get_total_flops()
            layers = _called(layers, shapes, unused)
            for name, _ in experts:  # an expert no row reaches stays a candidate: it takes its stack's option
                shapes.setdefault(name, [])
            layers += experts
            stack_of.update({name: s.name for s in opened for name in s.expert_names})
            tuple_output = not isinstance(output, torch.Tensor)
            example_call = example_call.with_hidden(output if isinstance(output, torch.Tensor) else output[0])
            grams = _grams(block, layers, calls, world)
            calls = [run_block(block, call) for call in calls]
            records += _records(layers, shapes, grams, grid, tied, world)
            close_stacks(opened, only_dense=False)
            unload(block)
    shapes = {}
    with flop_counter() as counter, observe(head_layers, shapes=shapes):
        head_inputs(model, stack, [example], [example_call.hidden], tuple_output)
    flops += counter.get_total_flops()
    head_layers = _called(head_layers, shapes, unused)
    if unused:
        warn(
            f"fxdecomp: {len(unused)} Linear layer(s) are never called as modules on the example batch, so they are kept "
            f"(their weight is read directly, as Mamba's dt_proj, or the example does not reach them, as an expert it is not "
            f"routed to): {', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}"
        )
    grams = _head_grams(model, stack, head_layers, batches, calls, tuple_output, world)
    records += _records(head_layers, shapes, grams, grid, tied, world)

    # 2. One plan for every layer.
    by_name = {r.name: r for r in records}
    planned, members = tie(records, stack_of)
    chosen = {}
    for record, option in zip(planned, solve(planned, budget.fraction, flops, scope)):
        for name in members.get(record.name, [record.name]):
            chosen[name] = expand(option, by_name[name]) if record.name in members else option

    # 3. Apply block by block, calibrated on the outputs of the compressed blocks before.
    writer = ShardWriter(out, shard_bytes) if out is not None and world.rank == 0 else None
    try:
        decisions: dict[str, Decision] = {}
        specs: dict = {}
        stacks: dict[str, bool] = {}  # the stacks with decomposed experts, as kept_record.expert_stacks
        calls = capture_block_inputs(model, stack, batches) if batches else []
        with Progress("compressing block", len(stack.blocks), progress) as report:
            for index in range(len(stack.blocks)):
                report.step(stack.name(index))
                block = load(index)
                opened = open_stacks(block, stack.name(index))
                layers = [(n, m) for n, m in linears(block, stack.name(index), exclude) + expert_layers(opened, exclude) if n in by_name]
                grams = _grams(block, layers, calls, world)
                decisions.update(_apply(model, layers, by_name, chosen, grams, world, specs, opened))
                stacks.update({s.name: s.linear_layout for s in close_stacks(opened)})
                calls = [run_block(block, call) for call in calls]
                if writer is not None:
                    for key, tensor in block.state_dict(prefix=stack.name(index) + ".").items():
                        writer.add(key, tensor)
                unload(block)
        grams = _head_grams(model, stack, head_layers, batches, calls, tuple_output, world)
        decisions.update(_apply(model, head_layers, by_name, chosen, grams, world, specs))

        ordered = [decisions[r.name] for r in records]
        # save_pretrained of the model in memory writes this record; load_compressed rebuilds the factors from it.
        entries = [KeptEntry(d.name, d.method, d.ranks, specs[d.name]) for d in ordered if d.decomposed]
        earlier = kept_record.expert_stacks(previous) if previous else {}
        kept_record.write(model, kept_record.merged(previous, entries, [], lambda name: _still_kept(model, earlier, name), stacks))
        saved_params = sum(d.params_before - d.params_after for d in ordered)
        if writer is not None:
            for key, tensor in model.state_dict().items():
                if not key.startswith(stack.path + "."):
                    writer.add(key, tensor)
            writer.close()
            _write_plan(Path(out), model, stack, ordered)
    except BaseException:
        if writer is not None:
            writer.abort()  # no part files or half-written shards left in ``out``
        raise
    if world.spread and out is not None:
        torch.distributed.barrier()  # the files are complete when any process returns
    element = bytes_before / params_before if params_before else 4
    return SequentialResult(
        model=None if lazy else model,
        decisions=ordered,
        flops_before=flops,
        flops_after=flops - sum(d.flops_before - d.flops_after for d in ordered),
        params_before=params_before,
        params_after=params_before - saved_params,
        bytes_before=bytes_before,
        bytes_after=bytes_before - int(saved_params * element),
        seconds=time.perf_counter() - start,
        output_dir=str(out) if out is not None else None,
    )


def _still_kept(model: nn.Module, stacks: dict[str, bool], name: str) -> bool:
    """Whether an earlier record's layer is still decomposed: a KeptLayer, a router holding its factors, or a kept expert."""
    return isinstance(_module_at(model, name), (KeptLayer, FactoredWeightOwner)) or is_kept_expert(model, stacks, name)


def _warn_stacked(model: nn.Module) -> None:
    opened = {".".join(p for p in (path, attribute) if p) for path, _, attribute in stacked_experts(model)}
    stacked = [name for name in stacked_weights(model) if name not in opened]
    if stacked:
        warn(
            f"fxdecomp: {len(stacked)} weight(s) of {type(model).__name__} stored stacked (one 3-D parameter for all "
            f"experts of a mixture of experts) keep their FLOPs, which the budget counts: "
            f"{', '.join(stacked[:4])}{', ...' if len(stacked) > 4 else ''}. compress_sequential decomposes the experts "
            "of a transformers experts module in its 'grouped_mm' implementation (model.set_experts_implementation("
            "'grouped_mm')); fxdecomp.compress(model, ...) decomposes the others it can capture"
        )


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed by a block's temporaries back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed pieces below its mmap threshold in its arenas, where a block's
    many medium temporaries would otherwise stay counted in the process's RSS.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _grams(block: nn.Module, layers, calls: list[BlockCall], world: World) -> dict[str, GramAccumulator]:
    """Input Gram matrices of the block's layers on ``calls``, summed over the processes."""
    grams: dict[str, GramAccumulator] = {}
    if calls:
        with observe(layers, grams=grams), torch.no_grad():
            for call in calls:
                block(*call.args, **call.kwargs)
        world.sum_grams(grams)
    return grams


def _head_grams(model, stack, head_layers, batches, calls, tuple_output, world: World) -> dict[str, GramAccumulator]:
    grams: dict[str, GramAccumulator] = {}
    if calls:
        with observe(head_layers, grams=grams):
            head_inputs(model, stack, batches, [c.hidden for c in calls], tuple_output)
        world.sum_grams(grams)
    return grams


def _called(layers: list, shapes: dict, unused: list[str]) -> list:
    """The layers whose forward ran (their input shapes were recorded); the others' names go to ``unused``."""
    unused += [name for name, _ in layers if name not in shapes]
    return [(name, layer) for name, layer in layers if name in shapes]


def _records(layers, shapes, grams, grid: int, tied: set[int], world: World) -> list[LayerRecord]:
    """The layers' records, each factorized by one process (dealt by cost) and shared with all."""
    owners = world.owners([factorization_cost(m) for _, m in layers])
    local = {
        name: layer_record(name, layer, shapes[name], grams.get(name), grid, id(layer.weight) in tied)
        for (name, layer), owner in zip(layers, owners)
        if owner == world.rank
    }
    shared = world.gather(local)
    return [shared[name] for name, _ in layers]


def _apply(model, layers, by_name, chosen, grams, world: World, specs: dict, opened=()) -> dict[str, Decision]:
    """Decompose the layers as planned, each factorized by one process and sent to the others. ``specs`` gets the
    `LinearSpec` of each decomposed layer; an expert of the ``opened`` stacks goes to its stack's experts."""
    owners = world.owners([factorization_cost(m) for _, m in layers])
    experts = {name for s in opened for name in s.expert_names}
    decisions, built = {}, []
    for (name, layer), owner in zip(layers, owners):
        install = (lambda n, m: install_expert(opened, n, m)) if name in experts else None
        decision, module = apply_option(model, by_name[name], layer, chosen[name], grams.get(name), owner == world.rank, install)
        decisions[name] = decision
        if module is not None:
            specs[name] = linear_spec(layer)
            built.append((module, owner))
    for module, owner in built:
        world.send_module(module, owner)
    return decisions


def place(target, device: torch.device, skip: str | None = None):
    """``target`` on ``device``: a module in place (its loaded tensors; ties kept; submodules under
    ``skip`` left alone), or a tuple of inputs (tensors moved, anything else kept). Returns it."""
    if not isinstance(target, nn.Module):
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in target)
    for name, module in target.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        for param in module._parameters.values():
            if param is not None and not param.is_meta and param.device != device:
                param.data = param.data.to(device)  # the same Parameter object: tied weights stay tied
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[key] = buffer.to(device)
    return target


def _module_at(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings and heads)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def _sizes(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model's distinct parameters."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _write_plan(out: Path, model: nn.Module, stack: BlockStack, decisions: list[Decision]) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.architectures = [type(model).__name__]  # the class load_compressed builds, as save_pretrained writes it
        config.to_json_file(out / "config.json")
    plan = {
        "format": "fxdecomp.sequential/1",
        "model_class": type(model).__name__,
        "blocks": stack.path,
        "decisions": [asdict(d) for d in decisions],
    }
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=1))
