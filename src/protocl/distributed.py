"""Cross-rank synchronisation of protocl's running state (``torch.distributed``, any backend).

Only state is synchronised: :class:`~protocl.PrototypeEMA` all-reduces its per-class feature sums and counts
before dividing, and :class:`~protocl.ClassBalancedThresholds` all-reduces its confidence histograms, one
collective per ``update`` call. Losses are per rank; averaging their gradients is DistributedDataParallel's job.
Every rank must call ``update`` the same number of times (it is a collective). Nothing happens when
``torch.distributed`` is not available, not initialised, or has a single rank.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_sum_"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all ranks (no-op when not distributed); returns it.

    Example:
        >>> import torch
        >>> t = torch.ones(3)
        >>> all_reduce_sum_(t)  # single process: unchanged
        tensor([1., 1., 1.])
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
