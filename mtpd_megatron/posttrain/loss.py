"""The post-training loss: the main head's CE plus each MTP head's loss from the pretraining code (mtpd/kl.py).

Head k (1-based) at position t predicts token t+k+1, the main head's target at t+k, so its teacher is the main
head's logits at t+k (detached: the paper's stop-gradient) and only positions t < s-k have one: the alignment of
mtpd/hook.py (student logits[:s-k], teacher[k:]). Each head's per-token loss is kl.head_loss, the fused
vocabulary-parallel CE + TopN KL of pretraining, here on one process (group None, the whole vocabulary on every
rank: DeepSpeed shards parameters and optimizer state, not the vocabulary). Heads are averaged over their valid
tokens and scaled by mtp.loss_scaling_factor / num_heads, as megatron scales its MTP loss:

    loss = CE_main + factor / K * sum_k mean_t [alpha_k CE_k(t) + beta_k T^2 D_k(t)]

`heads: ce` is the same with beta_k = 0 (MTPDSettings.from_config with MTP-D disabled), `frozen` has no head term.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtpd_megatron.mtpd.kl import DistillSpec, TeacherStats, head_loss, teacher_stats


class HeadObjective(NamedTuple):
    spec: DistillSpec
    alphas: tuple
    betas: tuple
    scale: float  # loss_scaling_factor / num_heads


def head_objective(mtp_cfg, heads_mode: str) -> Optional[HeadObjective]:
    """The heads' objective from the typed `mtp` section (the pretraining translation, mtpd/hook.py's
    MTPDSettings.from_config); None for frozen heads."""
    if heads_mode == "frozen":
        return None
    from mtpd_megatron.mtpd.hook import MTPDSettings

    cfg = dataclasses.replace(mtp_cfg, mtpd=dataclasses.replace(mtp_cfg.mtpd, enabled=heads_mode == "mtpd"))
    s = MTPDSettings.from_config(cfg)
    return HeadObjective(
        spec=s.spec, alphas=s.alphas, betas=s.betas, scale=float(mtp_cfg.loss_scaling_factor) / mtp_cfg.num_heads
    )


class LossParts(NamedTuple):
    loss: Tensor  # scalar, differentiable
    main_ce: Tensor  # scalar, detached
    head_ce: list  # per head, detached scalars
    head_kl: list


def posttrain_loss(
    main_logits: Tensor,
    head_logits: list,
    labels: Tensor,
    objective: Optional[HeadObjective],
    mask: Optional[Tensor] = None,
) -> LossParts:
    """main_logits [b, s, V], head_logits K x [b, s, V], labels [b, s] (labels[t] = token t+1), mask [b, s]
    (1 = labels[t] is a real target; default all)."""
    b, s, vocab = main_logits.shape
    cdt = torch.float64 if main_logits.dtype == torch.float64 else torch.float32  # fp32 math, float64 exact tests
    mask = torch.ones(b, s, device=main_logits.device, dtype=cdt) if mask is None else mask.to(main_logits.device, cdt)
    ce = F.cross_entropy(main_logits.to(cdt).reshape(-1, vocab), labels.reshape(-1), reduction="none")
    main_ce = (ce * mask.reshape(-1)).sum() / mask.sum().clamp_min(1)
    total, head_ce, head_kl = main_ce, [], []
    if objective is None or not head_logits:
        return LossParts(total, main_ce.detach(), head_ce, head_kl)
    teacher = main_logits.detach()
    stats = teacher_stats(teacher.reshape(b * s, vocab), objective.spec, vocab, 0)
    stats = TeacherStats(*(field.view(b, s) for field in stats))
    for k, student in enumerate(head_logits, start=1):
        if k >= s:
            break
        rows = s - k
        n = b * rows
        aligned = TeacherStats(*(field[:, k:].reshape(n) for field in stats))
        out = head_loss(
            student[:, :rows].reshape(n, vocab),
            teacher[:, k:].reshape(n, vocab),
            aligned,
            labels[:, k:].reshape(n),
            alpha=objective.alphas[k - 1],
            beta=objective.betas[k - 1],
            spec=objective.spec,
            vocab_size=vocab,
            vocab_start=0,
        )
        m = mask[:, k:].reshape(n)
        denom = m.sum().clamp_min(1)
        total = total + objective.scale * (out.loss * m).sum() / denom
        head_ce.append(((out.ce * m).sum() / denom).detach())
        head_kl.append(((out.kl * m).sum() / denom).detach())
    return LossParts(total, main_ce.detach(), head_ce, head_kl)
