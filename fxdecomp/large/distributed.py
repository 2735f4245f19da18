"""Spreading the sequential pipeline over processes with torch.distributed.

Launched by ``torchrun``, every process runs the
same block loop. Calibration is data-parallel: each rank streams its share of
the batches, and the Gram matrices are summed over ranks (``all_reduce``)
before anything is factorized, so every rank holds the statistics of all the
data. Within a block the layers are dealt to ranks by their factorization cost
(longest first, each to the least loaded rank); each rank factorizes its own,
the options of the plan are exchanged with ``all_gather_object``, and each
decomposed module's tensors are sent from the rank that built it
(``broadcast``). The result equals a single process's, to float tolerance.

Example (two processes on one machine)::

    torchrun --nproc-per-node 2 -m fxdecomp compress-llm llama-dir --out small --budget 0.8
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..calibration import GramAccumulator


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` (size 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def spread(self) -> bool:
        return self.size > 1

    def share(self, items: list) -> list:
        """This rank's share of ``items`` (every size-th, starting at its rank)."""
        return items[self.rank :: self.size]

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that handles each job: longest first, each to the least loaded rank (LPT)."""
        loads, owner = [0.0] * self.size, [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.size), key=lambda r: (loads[r], r))
            owner[index] = rank
            loads[rank] += costs[index]
        return owner

    def sum_grams(self, grams: dict[str, GramAccumulator]) -> None:
        """Sum every distinct accumulator (shared ones once) and its row count over the ranks, in place."""
        if not self.spread:
            return
        for gram in {id(g): g for g in grams.values()}.values():
            if gram.sketches is not None:
                for sketch in gram.sketches:
                    dist.all_reduce(sketch.sketch)
                    dist.all_reduce(sketch.trace)
            else:
                dist.all_reduce(gram.sum)
                dist.all_reduce(gram.unit_squares)
            device = gram.sketches[0].sketch.device if gram.sketches is not None else gram.sum.device
            count = torch.tensor([gram.count, gram.units], dtype=torch.float64, device=device)
            dist.all_reduce(count)
            gram.count = int(count[0].item())
            gram.units = int(count[1].item()) if count[1] >= 0 and gram.units >= 0 else -1

    def gather(self, local: dict) -> dict:
        """The union of every rank's ``local`` mapping."""
        if not self.spread:
            return local
        parts: list = [None] * self.size
        dist.all_gather_object(parts, local)
        return {key: value for part in parts for key, value in part.items()}

    def send_module(self, module: nn.Module, owner: int) -> None:
        """Every tensor of ``module`` (the same structure on every rank) overwritten with the owner's."""
        if not self.spread:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=owner)


def init_from_environment(device: str | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment.

    ``device`` "cuda" (the default where CUDA is available): NCCL, each process on the GPU
    ``LOCAL_RANK`` (``torch.cuda.set_device``), so `compress_sequential` runs its blocks and
    factorizations there; "cpu": gloo, everything on the CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend="nccl")
        else:
            dist.init_process_group(backend="gloo")
    return World.current()


def default_device() -> torch.device:
    """The GPU of this process under an NCCL process group, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
