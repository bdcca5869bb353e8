"""Small tensor-parallel reductions used by the MTP-D loss (outside autograd: gradients are written by hand)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def tp_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(x: Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> Tensor:
    if tp_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_cat(x: Tensor, group: Optional[dist.ProcessGroup], dim: int = -1) -> Tensor:
    """Concatenate `x` from every rank of `group` along `dim` (rank order)."""
    if tp_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def global_argmax(local: Tensor, vocab_start: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Argmax over a vocabulary sharded on the last dim; ties go to the lowest global index.

    Deterministic and independent of the TP size: every shard sends (max value, global index of its first
    maximum) and the winner is the largest value, then the smallest index.
    """
    values, idx = local.max(dim=-1)  # torch.max returns the first maximal index
    return combine_argmax(values, idx, vocab_start, group)


def combine_argmax(values: Tensor, idx: Tensor, vocab_start: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Global argmax from each shard's (row max, local index of its first maximum)."""
    if tp_size(group) == 1:
        return idx + vocab_start
    packed = torch.stack([values.double(), (idx + vocab_start).double()], dim=-1)  # [..., 2]
    gathered = all_gather_cat(packed.unsqueeze(-2), group, dim=-2)  # [..., tp, 2]
    best = gathered[..., 0].max(dim=-1, keepdim=True).values
    cand = torch.where(gathered[..., 0] == best, gathered[..., 1], torch.full_like(gathered[..., 1], float("inf")))
    return cand.min(dim=-1).values.long()
