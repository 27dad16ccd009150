"""Data-parallel calibration on torch.distributed, for runs launched with ``torchrun`` or
``accelerate launch`` (gloo on the CPU, NCCL on CUDA devices).

Each process walks the layers over its own shard of the calibration windows; a method sums its
per-layer statistics (Hessians, activation norms, search losses) over the processes through
``context.all_reduce`` before it solves, so every process makes the same change to the layer.
One process (rank 0) writes the run folder, the checkpoints, the export and the report.

In a single process every function here is the identity, so a method calls them always and
never talks to torch.distributed itself.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_environment(device: torch.device) -> bool:
    """Join the process group a launcher describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...): NCCL when this process computes on CUDA, else gloo. Returns whether
    there is more than one process."""
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return active()


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place, and return it (the identity in one
    process). Every process must call it in the same order with tensors of the same shape."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_count(count: int | float, device: torch.device | None = None) -> float:
    """``count`` summed over every process (a number, such as the tokens a statistic saw)."""
    if not active():
        return count
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item()


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This process's share of the calibration ``windows`` (rows ``rank, rank + world, ...``)."""
    if not active():
        return windows
    if windows.shape[0] < world_size():
        from .errors import PocketError

        raise PocketError(f"{windows.shape[0]} calibration windows cannot be shared by {world_size()} processes",
                          field="calibration.samples", fix=f"set samples to at least {world_size()}, or launch fewer processes")
    return windows[rank()::world_size()]


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """Wait for every process, then leave the process group: what follows runs in each process
    alone (rank 0 writes the export and the report)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
