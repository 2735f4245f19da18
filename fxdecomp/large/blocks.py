"""Running a model's stack of blocks one block at a time.

The model's repeated blocks (the decoder layers of a causal LM, the encoder
layers of an encoder) form its longest ``nn.ModuleList``. `capture_block_inputs`
runs the model until its first block and records what the block receives (the
hidden states and every other argument: attention mask, rotary embeddings,
position ids), the technique GPTQ and llm-compressor use; each block is then
run on its own with `run_block`, on the previous block's outputs. Modules
before the first block must be materialized; later ones are never touched.
`head_inputs` runs what follows the last block (final norm, head) on stored
hidden states, with every block replaced by a stand-in.

Example::

    stack = BlockStack.of(model)
    calls = capture_block_inputs(model, stack, batches)
    for index, block in enumerate(stack.blocks):
        calls = [run_block(block, call) for call in calls]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..kept_experts import KeptExperts
from ..errors import InvalidInputError
from ..export_capture import no_kv_cache


@dataclass(frozen=True)
class BlockStack:
    """Where a model's blocks are: ``path`` of the ModuleList, and the list itself."""

    path: str
    blocks: nn.ModuleList

    @classmethod
    def of(cls, model: nn.Module) -> "BlockStack":
        """The longest ModuleList in ``model``; raises `InvalidInputError` if there is none."""
        # A kept mixture of experts' KeptExperts (one layer per expert) is a ModuleList too, and often the longest.
        lists = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and not isinstance(m, KeptExperts) and len(m) > 0]
        if not lists:
            raise InvalidInputError(
                f"{type(model).__name__} has no nn.ModuleList of blocks (decoder or encoder layers) to stream; "
                "use fxdecomp.compress for models without a stack of blocks"
            )
        path, blocks = max(lists, key=lambda item: len(item[1]))
        return cls(path, blocks)

    def name(self, index: int) -> str:
        return f"{self.path}.{index}"


@dataclass(frozen=True)
class BlockCall:
    """One batch's call of a block: positional and keyword arguments; ``args[0]`` is the hidden states."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        return replace(self, args=(hidden, *self.args[1:]))


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, calls: list[BlockCall]):
        super().__init__()
        self.calls = calls

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs and not args:
            args = (kwargs.pop("hidden_states"),)
        self.calls.append(BlockCall(tuple(args), dict(kwargs)))
        raise _Stop


@torch.no_grad()
def capture_block_inputs(model: nn.Module, stack: BlockStack, batches: Iterable[tuple]) -> list[BlockCall]:
    """What the first block receives for each batch (the model is run up to it, once per batch).

    Raises `InvalidInputError` if a batch does not reach the first block.
    """
    calls: list[BlockCall] = []
    first = stack.blocks[0]
    stack.blocks[0] = _Catcher(calls)
    # No KV cache: a cache object among a block's arguments grows with every replay of the call (Falcon, BLOOM and
    # Gemma 2 hand it on: the second run of a block saw twice the keys).
    try:
        with no_kv_cache(model):
            for index, batch in enumerate(batches):
                try:
                    model(*batch)
                except _Stop:
                    continue
                raise InvalidInputError(f"batch {index} ran through {type(model).__name__} without reaching {stack.name(0)}")
    finally:
        stack.blocks[0] = first
    return calls


def _hidden_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def run_block(block: nn.Module, call: BlockCall) -> BlockCall:
    """The block's call on ``call``: the same arguments with the block's output as hidden states."""
    return call.with_hidden(_hidden_of(block(*call.args, **call.kwargs)))


class _Replay(nn.Module):
    """Stands in for a block: the last one hands out stored hidden states, the others pass theirs on."""

    def __init__(self, outputs: list[torch.Tensor] | None, tuple_output: bool):
        super().__init__()
        self.outputs, self.tuple_output = outputs, tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        hidden = self.outputs.pop(0) if self.outputs is not None else hidden_states
        return (hidden,) if self.tuple_output else hidden


@torch.no_grad()
def head_inputs(
    model: nn.Module,
    stack: BlockStack,
    batches: Iterable[tuple],
    final_hidden: list[torch.Tensor],
    tuple_output: bool,
    observe: Callable[[], Any] | None = None,
) -> list[Any]:
    """Run the model with its blocks replaced, so that what follows them sees ``final_hidden``.

    Returns the model's outputs per batch; hooks installed by the caller on the
    head observe its inputs.
    """
    saved = list(stack.blocks)
    outputs = list(final_hidden)
    for index in range(len(saved)):
        stack.blocks[index] = _Replay(outputs if index == len(saved) - 1 else None, tuple_output)
    try:
        with no_kv_cache(model):
            return [model(*batch) for batch in batches]
    finally:
        for index, block in enumerate(saved):
            stack.blocks[index] = block
