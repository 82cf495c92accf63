r"""Thin torch.distributed helpers for the example (no-ops in a single process); sums over ranks use
:func:`protocl.distributed.all_reduce_sum_`.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` initialises the default process group
(NCCL on CUDA, gloo on CPU) from them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def setup(device: str) -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; return (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            tdist.init_process_group("nccl")
            return tdist.get_rank(), world, torch.device("cuda", local_rank)
        tdist.init_process_group("gloo")
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size(), torch.device(device)
    return 0, 1, torch.device(device)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()
