"""Data-parallel training under ``torchrun``, on PyTorch's own engine; a no-op otherwise.

The backend follows the device the model actually runs on (NCCL for CUDA, gloo for the CPU),
gradients are reduced by ``DistributedDataParallel`` (bucketed all-reduce overlapped with the
backward pass, ``no_sync`` while accumulating), and each process tokenises only its share of
the data (``shard_map``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """This process's rank and the number of processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment, if any.

    NCCL when the model runs on CUDA (that process's GPU becomes the current one), else gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def data_parallel(module: nn.Module, params: Sequence[nn.Parameter], world: World) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when there are several processes.

    The trainable parameters start equal everywhere (rank 0's are broadcast); the frozen base
    is loaded identically by every process, so DDP's own start-up broadcast of every weight
    (the whole model) is skipped. DDP averages gradients; the loop scales its loss by the
    number of processes, so the result is the sum its token-mean loss needs.
    """
    if world.size == 1:
        return module
    with torch.no_grad():
        for param in params:
            dist.broadcast(param, src=0)
    device = params[0].device
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,
        init_sync=False,
    )


def accumulating(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce for a micro-batch that is not the step's last (DDP's no_sync)."""
    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Sum tensors in place over all processes (loss totals, routers' counters)."""
    if world.size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def shard_map(fn: Callable[[T], R], items: Sequence[T], world: World) -> list[R]:
    """``[fn(x) for x in items]``, each process computing every ``world.size``-th item.

    The results are exchanged, so every process ends with the full list in order while doing
    only its share of the work (tokenisation, for example).
    """
    mine = [fn(item) for item in items[world.rank :: world.size]]
    if world.size == 1:
        return mine
    shares: list[list[R] | None] = [None] * world.size
    dist.all_gather_object(shares, mine)
    return list(interleave(shares, len(items)))


def interleave(shares: Sequence[Sequence[R] | None], total: int) -> Iterator[R]:
    """Items ``rank, rank + size, ...`` of each share back in their original order."""
    for index in range(total):
        yield shares[index % len(shares)][index // len(shares)]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
