"""Multi-process training on torchrun: DistributedDataParallel over gloo (CPU) or NCCL (GPUs).

`torchrun --nproc-per-node N -m nin train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; with a
world of one process every helper here is a no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.size > 1


def init_world(device: str | None = None) -> World:
    """Join the process group torchrun describes in the environment (if any): NCCL when the
    processes train on GPUs, gloo when they train on CPUs (`device`, as `--device` names it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    on_gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return world


def world_device(world: World, requested: str | None) -> tuple[torch.device, str] | None:
    """Under torchrun, unless `--device` says otherwise, each process's GPU: its local rank's."""
    if world.active and not requested and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank), f"local rank {world.local_rank}"
    return None


def close_world(world: World) -> None:
    """Leave the process group once every process is done."""
    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective needs its tensor: the GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """`t` summed (or maxed) over every process; `t` itself in a single process."""
    if not world.active:
        return t
    moved = t.to(comm_device(t), copy=True)  # a copy: the caller's own sum stays its own
    dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return moved.to(t.device)


def all_gather(t: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every process's `t` (same shape on each), in rank order, on `t`'s device."""
    if not world.active:
        return [t]
    moved = t.to(comm_device(t))
    out = [torch.empty_like(moved) for _ in range(world.size)]
    dist.all_gather(out, moved)
    return [o.to(t.device) for o in out]


def broadcast_buffers(model: torch.nn.Module, world: World) -> None:
    """Give every process rank 0's buffers (batch-norm statistics), so all evaluate one model."""
    if world.active:
        for buffer in model.buffers():
            moved = buffer.to(comm_device(buffer))
            dist.broadcast(moved, src=0)
            buffer.copy_(moved)


def broadcast_text(text: str, world: World) -> str:
    """Rank 0's `text` on every process."""
    if not world.active:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]
