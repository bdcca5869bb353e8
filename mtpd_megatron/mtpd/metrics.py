"""Per-head MTP-D metrics: CE, KL, teacher mass in TopN, label accuracy and acceptance against the main head.

Acceptance follows shared/research/paper.md: head k's draft at position t is accepted when
argmax(head_k[t]) == argmax(main[t+k]); a_k = P(head k accepted | heads < k accepted) and
CAR_k = prod_{j<=k} a_j, tau = 1 + sum_k CAR_k. Teacher-forced: we count, over positions valid for head k,
acc_k = #(heads 1..k all accepted) and base_k = #(heads 1..k-1 all accepted); a_k = acc_k / base_k.

Sums are kept as device tensors (no host sync per step) and reduced over data-parallel ranks only when a
summary is asked for. Tensor-parallel ranks hold identical values (every quantity is already all-reduced).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

FIELDS = ("tokens", "ce", "kl", "topn_mass", "label_correct", "accept", "accept_base")
_IDX = {name: i for i, name in enumerate(FIELDS)}


class MTPDMetrics:
    """Accumulates per-head sums between two summaries."""

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self._sums: Optional[Tensor] = None

    def add(self, head: int, **values: Tensor) -> None:
        """Add sums for head `head` (0-based); keys from FIELDS, each a scalar tensor."""
        if self._sums is None:
            device = next(iter(values.values())).device
            self._sums = torch.zeros(self.num_heads, len(FIELDS), dtype=torch.float64, device=device)
        for name, value in values.items():
            self._sums[head, _IDX[name]] += value.detach().to(torch.float64)

    def reset(self) -> None:
        self._sums = None

    def raw(self, group: Optional[dist.ProcessGroup] = None) -> Tensor:
        """[num_heads, len(FIELDS)] sums, all-reduced over `group` (e.g. the data-parallel group)."""
        if self._sums is not None:
            sums = self._sums.clone()
        else:  # nothing added on this rank (e.g. a pipeline stage without the heads): zeros on the comm device
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            sums = torch.zeros(self.num_heads, len(FIELDS), dtype=torch.float64, device=device)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        return sums

    def summary(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        return summarize(self.raw(group))


def summarize(sums: Tensor) -> dict[str, float]:
    """Turn per-head sums into the logged metrics (means, a_k, CAR_k, tau)."""
    out: dict[str, float] = {}
    car, tau = 1.0, 1.0
    for k in range(sums.shape[0]):
        row = sums[k].tolist()
        n = max(row[_IDX["tokens"]], 1.0)
        out[f"mtp{k + 1}/ce"] = row[_IDX["ce"]] / n
        out[f"mtp{k + 1}/kl"] = row[_IDX["kl"]] / n
        out[f"mtp{k + 1}/topn_mass"] = row[_IDX["topn_mass"]] / n
        out[f"mtp{k + 1}/label_acc"] = row[_IDX["label_correct"]] / n
        base = row[_IDX["accept_base"]]
        a_k = row[_IDX["accept"]] / base if base > 0 else 0.0
        car *= a_k
        tau += car
        out[f"mtp{k + 1}/accept"] = a_k
        out[f"mtp{k + 1}/car"] = car
    out["tau"] = tau
    return out
