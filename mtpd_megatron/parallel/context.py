"""Context parallelism (CP): megatron's load-balanced sequence layout and the pieces built on it here.

Layout (megatron-core's, also TE's and Megatron-LM's `get_batch_on_this_cp_rank`): a sequence of s tokens is
cut into 2·CP chunks of c = s / (2·CP) tokens, and CP rank r holds chunks r and 2·CP−1−r, in that order
(for CP = 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2). Causal attention then costs every rank the
same: its early chunk sees few keys, its late chunk many. megatron-core already follows this layout for
RoPE (`get_pos_emb_on_this_cp_rank`), for rolling labels and masks (`roll_tensor` with a cp_group) and in
the MTP block; this module supplies what is ours:

* `split_batch`: cuts one micro-batch's [b, s] tensors into this rank's two chunks (the trainer's data path).
* `global_positions`: the global position of every local token (the attention's causal structure, tests).
* `Lookahead`: MTP-D's teacher across ranks. Head k at position t learns from the main head at t+k; at the
  last k positions of a local chunk that row lives in the next chunk, which is on a neighbouring rank (or,
  for chunk CP−1, in the same rank's second chunk). Each rank receives the first K = num_heads rows of the
  teacher logits of each chunk's successor once per micro-batch and appends them to that chunk; head k's
  teacher for chunk i is then the view `extended[i][k : k + c]`. Packed sequences (THD, every document
  split over the ranks in the same way) are segments of their own: a document chunk shorter than K takes
  several rounds of the same exchange. The exchange is differentiable (its backward sends gradients back),
  for the seesaw ablation whose teacher keeps its graph.
Costs and the alternatives measured: docs/design.md, "Context parallelism".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def chunk_order(cp: int, rank: int) -> tuple[int, int]:
    """The global chunk indices this rank holds, in local order."""
    return rank, 2 * cp - 1 - rank


def global_positions(local_len: int, cp: int, rank: int, device=None) -> Tensor:
    """[local_len] global positions of this rank's tokens (two chunks of local_len / 2)."""
    c = local_len // 2
    first, second = chunk_order(cp, rank)
    offsets = torch.arange(c, device=device)
    return torch.cat([first * c + offsets, second * c + offsets])


def split_batch(tensors: dict, cp: int, rank: int, seq_dim: int = 1) -> dict:
    """This CP rank's part of a micro-batch: along `seq_dim`, the chunks `chunk_order(cp, rank)` of 2·CP.

    Every tensor with the full sequence length on `seq_dim` is split; others pass unchanged. One
    index_select per tensor (a copy of the local half-chunks, nothing else).
    """
    if cp == 1:
        return tensors
    out = {}
    for name, x in tensors.items():
        if x is None or x.dim() <= seq_dim:
            out[name] = x
            continue
        s = x.shape[seq_dim]
        if s % (2 * cp):
            raise ValueError(f"{name}: sequence length {s} is not divisible by 2 x context_parallel_size = {2 * cp}")
        chunks = x.view(*x.shape[:seq_dim], 2 * cp, s // (2 * cp), *x.shape[seq_dim + 1 :])
        index = torch.tensor(chunk_order(cp, rank), device=x.device)
        out[name] = chunks.index_select(seq_dim, index).reshape(*x.shape[:seq_dim], -1, *x.shape[seq_dim + 1 :])
    return out


def gather_sequence(local: Tensor, group: Optional[dist.ProcessGroup], seq_dim: int = 0) -> Tensor:
    """Inverse of `split_batch` over the CP group (not differentiable): the full sequence in global order.
    For tests and diagnostics; training never gathers the sequence."""
    cp = group_size(group)
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    chunks = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        a, b = part.chunk(2, dim=seq_dim)
        first, second = chunk_order(cp, rank)
        chunks[first], chunks[second] = a, b
    return torch.cat(chunks, dim=seq_dim)


# ----------------------------------------------------------------------------------------------------------
# Neighbour exchange (differentiable)
# ----------------------------------------------------------------------------------------------------------


def _neighbour_p2p(send_prev: Tensor, send_next: Tensor, group) -> tuple[Tensor, Tensor]:
    """Send `send_prev` to CP rank r−1 and `send_next` to r+1; return (from r−1, from r+1), zeros at the
    ends of the rank line (rank 0 has no previous rank, the last rank no next one)."""
    ranks = dist.get_process_group_ranks(group)
    rank, size = dist.get_rank(group), len(ranks)
    send_prev, send_next = send_prev.contiguous(), send_next.contiguous()
    from_prev, from_next = torch.zeros_like(send_next), torch.zeros_like(send_prev)
    requests = []
    if rank > 0:
        requests.append(dist.isend(send_prev, dst=ranks[rank - 1], group=group))
        requests.append(dist.irecv(from_prev, src=ranks[rank - 1], group=group))
    if rank < size - 1:
        requests.append(dist.irecv(from_next, src=ranks[rank + 1], group=group))
        requests.append(dist.isend(send_next, dst=ranks[rank + 1], group=group))
    for request in requests:
        request.wait()
    return from_prev, from_next


class _NeighbourExchange(torch.autograd.Function):
    """Forward: (to r−1, to r+1) -> (from r−1, from r+1). Backward: the gradients travel the reverse way
    (what came from r+1 sends its gradient back to r+1, and so on), by the same exchange."""

    @staticmethod
    def forward(ctx, send_prev, send_next, group):
        ctx.group = group
        return _neighbour_p2p(send_prev, send_next, group)

    @staticmethod
    def backward(ctx, grad_from_prev, grad_from_next):
        grad_send_prev, grad_send_next = _neighbour_p2p(grad_from_prev, grad_from_next, ctx.group)
        return grad_send_prev, grad_send_next, None


# ----------------------------------------------------------------------------------------------------------
# MTP-D's teacher across CP ranks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    start: int  # local row where the chunk starts
    length: int
    first_half: bool  # the rank's chunk r of a (document) sequence, else its chunk 2·CP−1−r


class Lookahead:
    """Which local rows hold each chunk of this CP rank, and how head k's teacher is found for every row.

    `extend(teacher)` ([s, b, V/tp], any trailing shape) returns the extended teacher
    [seg_0 ; look_0 ; seg_1 ; look_1 ; ...] along dim 0, look_i being the first `depth` rows of the chunk
    that follows segment i in the global sequence (zeros after the last chunk of a sequence: those rows are
    never valid, their loss mask is 0). `pieces(k, batch)` then gives, in flattened [rows·batch] units,
    (lo, hi, offset): the student rows [lo, hi) have their teacher at rows [lo+offset, hi+offset) of the
    extended teacher — one piece per segment, a view each, so no head copies the teacher.
    """

    def __init__(self, local_len: int, depth: int, group, packed_seq_params=None):
        self.group, self.depth, self.local_len = group, depth, local_len
        self.cp, self.rank = group_size(group), dist.get_rank(group)
        segments: list[_Segment] = []
        if packed_seq_params is None:
            if local_len % 2:
                raise ValueError(f"context parallelism: local sequence length {local_len} is odd (expected 2 chunks)")
            c = local_len // 2
            segments = [_Segment(0, c, True), _Segment(c, c, False)]
        else:  # THD: every document is split over the CP ranks like a sequence of its own
            cu = [int(x) for x in packed_seq_params.cu_seqlens_q.tolist()]
            covered = 0
            for start, end in zip(cu[:-1], cu[1:]):
                if (end - start) % (2 * self.cp):
                    raise ValueError(
                        f"context parallelism: packed sequence of length {end - start} is not divisible "
                        f"by 2 x context_parallel_size = {2 * self.cp} (pad each sequence)"
                    )
                lo, n = start // self.cp, (end - start) // self.cp
                if lo != covered:
                    raise ValueError("context parallelism: packed sequences must tile the local sequence")
                if n:
                    segments += [_Segment(lo, n // 2, True), _Segment(lo + n // 2, n // 2, False)]
                covered = lo + n
            if covered != local_len:
                raise ValueError(f"context parallelism: packed sequences cover {covered} of {local_len} local rows")
        self.segments = segments
        shortest = min((s.length for s in segments), default=depth) or depth
        self.rounds = math.ceil(depth / shortest) if depth else 0  # the same on every rank (same lengths)

    def extend(self, teacher: Tensor) -> Tensor:
        """The extended teacher (see the class docstring); differentiable in `teacher`."""
        d = self.depth
        segs = [teacher[s.start : s.start + s.length] for s in self.segments]
        zeros = teacher.new_zeros((d, *teacher.shape[1:]))
        looks = [zeros] * len(segs)
        first = [i for i, s in enumerate(self.segments) if s.first_half]
        second = [i for i, s in enumerate(self.segments) if not s.first_half]
        last_rank = self.rank == self.cp - 1
        for _ in range(self.rounds):
            # what each segment offers its predecessor: its first d rows (its lookahead fills in short ones)
            heads = [torch.cat([seg, look])[:d] if seg.shape[0] < d else seg[:d] for seg, look in zip(segs, looks)]
            to_prev = torch.stack([heads[i] for i in first])  # first halves' predecessors are on rank r−1 ...
            to_next = torch.stack([heads[i] for i in second])  # ... second halves' on rank r+1
            from_prev, from_next = _NeighbourExchange.apply(to_prev, to_next, self.group)
            new = list(looks)
            for j, i in enumerate(first):  # the successor of chunk r is chunk r+1: rank r+1's first half,
                new[i] = heads[second[j]] if last_rank else from_next[j]  # or, for r = CP−1, our own second half
            for j, i in enumerate(second):  # the successor of chunk 2CP−1−r is rank r−1's second half
                new[i] = from_prev[j]  # (zeros on rank 0: the sequence ends there)
            looks = new
        parts = []
        for seg, look in zip(segs, looks):
            parts += [seg, look]
        return torch.cat(parts) if parts else teacher

    def pieces(self, k: int, batch: int) -> list[tuple[int, int, int]]:
        """Head k (1-based): [(lo, hi, offset)] in flattened rows (position·batch + sample)."""
        if k > self.depth:
            raise ValueError(f"head {k} beyond the lookahead depth {self.depth}")
        return [
            (s.start * batch, (s.start + s.length) * batch, (i * self.depth + k) * batch)
            for i, s in enumerate(self.segments)
        ]

    @staticmethod
    def align(values: Tensor, pieces: Sequence[tuple[int, int, int]]) -> Tensor:
        """Per-row values of the extended teacher (e.g. its argmax) at the rows `pieces` picks, student order."""
        return torch.cat([values[lo + off : hi + off] for lo, hi, off in pieces])
