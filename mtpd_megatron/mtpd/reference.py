"""Single-process float64 reference of the MTP-D head loss, written plainly from the formula.

Used only by tests (and as executable documentation): full-vocabulary tensors, torch autograd for the
gradients, no sharding and no chunking. The TopN set keeps every logit >= the N-th largest (ties kept).
"""

from __future__ import annotations

import torch
from torch import Tensor


def topn_set(teacher: Tensor, topn: int) -> Tensor:
    """Boolean [T, V] membership of the teacher's TopN set (all ties at the threshold included)."""
    vocab = teacher.shape[-1]
    if topn <= 0 or topn >= vocab:
        return torch.ones_like(teacher, dtype=torch.bool)
    tau = torch.sort(teacher, dim=-1, descending=True).values[:, topn - 1 : topn]
    return teacher >= tau


def reference_head_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    beta: float,
    topn: int,
    direction: str,
    mode: str,
    temperature: float,
    objective: str = "kl",
    lk_lambda: float = 0.5,
    detach_teacher: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (loss, ce, divergence) with autograd through `student` (and through `teacher` only when
    `detach_teacher` is False: the seesaw ablation). Divergence = KL, or lambda KL + (1 - lambda) TV ("lk")."""
    z = student.double()
    u = (teacher.detach() if detach_teacher else teacher).double()
    S = topn_set(u.detach(), topn)
    ce = torch.logsumexp(z, -1) - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    zt, ut = z / temperature, u / temperature
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    if mode == "renorm" or S.all():
        logP = zt.masked_fill(~S, neg_inf).log_softmax(-1)
        logQ = ut.masked_fill(~S, neg_inf).log_softmax(-1)
        P, Q = logP.exp(), logQ.exp()
        dlog = torch.where(S, logP - logQ, torch.zeros_like(logP))
        kl = (Q * -dlog).sum(-1) if direction == "forward" else (P * dlog).sum(-1)
        tv = 0.5 * torch.where(S, (P - Q).abs(), torch.zeros_like(P)).sum(-1)
    else:  # tail: TopN buckets + one bucket for the remaining mass
        lp, lq = zt.log_softmax(-1), ut.log_softmax(-1)
        P = torch.where(S, lp.exp(), torch.zeros_like(lp))
        Q = torch.where(S, lq.exp(), torch.zeros_like(lq))
        Pt = torch.where(S, torch.zeros_like(lp), lp.exp()).sum(-1)
        Qt = torch.where(S, torch.zeros_like(lq), lq.exp()).sum(-1)
        dlog = torch.where(S, lp - lq, torch.zeros_like(lp))
        if direction == "forward":
            kl = (Q * -dlog).sum(-1) + Qt * (Qt.log() - Pt.log())
        else:
            kl = (P * dlog).sum(-1) + Pt * (Pt.log() - Qt.log())
        tv = 0.5 * ((P - Q).abs().sum(-1) + (Pt - Qt).abs())
    if objective == "lk":
        kl = lk_lambda * kl + (1.0 - lk_lambda) * tv
    loss = alpha * ce + beta * temperature**2 * kl
    return loss, ce.detach(), kl.detach()
