"""Data-parallel training under ``torchrun``: gloo on CPU, NCCL on GPUs; a no-op otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank and the number of processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Sum tensors in place over all processes (gradients, loss totals)."""
    if world.size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
