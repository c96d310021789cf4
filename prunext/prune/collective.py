"""What the prune path's steps share under torchrun: which rank this is, and sums and unions over ranks.

Each helper is the identity without a process group, so every step runs the
same code in one process and under torchrun.
"""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running ``torch.distributed`` group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where a tensor must be for a collective of the running backend (NCCL: this rank's GPU)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (itself without a process group), on ``t``'s device."""
    if rank_and_world()[1] == 1:
        return t
    x = t.to(_collective_device())
    torch.distributed.all_reduce(x)
    return x.to(t.device)


def merge_over_ranks(part: dict) -> dict:
    """The union of every rank's ``part`` (CPU tensors inside); ``part`` itself without a process group."""
    if rank_and_world()[1] == 1:
        return part
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}
