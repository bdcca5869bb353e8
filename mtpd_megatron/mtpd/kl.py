"""Vocabulary-parallel cross-entropy + TopN self-distillation KL for one MTP head, fused, exact gradients.

Logits stay sharded as [tokens, V/tp] on every tensor-parallel rank; no rank materialises the full
vocabulary. Everything global is a per-token scalar obtained by all-reduce (max, sums) or a gather of a few
values per token (the teacher's TopN threshold, argmaxes).

Notation (per token, temperature T, teacher logits u, student logits z):
  S            teacher's TopN set: {i : u_i >= tau}, tau = N-th largest u. Ties at tau are all kept, so the
               set is a deterministic function of the logits and independent of the TP layout (|S| >= N).
               N = 0 or N >= V means the whole vocabulary.
  renorm mode  P_i = softmax_S(z/T)_i, Q_i = softmax_S(u/T)_i over i in S (the paper's P~, Q~).
  tail mode    P_i = softmax(z/T)_i, Q_i = softmax(u/T)_i for i in S, plus one bucket t holding the
               remaining mass P_t = sum_{i not in S} softmax(z/T)_i (and Q_t likewise).
  forward KL   KL(Q || P) = sum_b Q_b (log Q_b - log P_b)      (teacher first; the default)
  reverse KL   KL(P || Q) = sum_b P_b (log P_b - log Q_b)
  loss         alpha * CE(z, label) + beta * T^2 * KL          (T^2 keeps gradient scale temperature-free)

Gradients w.r.t. z_j (derived in docs/design.md, checked against a float64 autograd reference in tests):
  CE           p_j - 1[j = label]                    with p = softmax(z)
  forward KL   (P_j - R_j) / T,   R_j = Q_j for j in S; R_j = Q_t * p_j / P_t for j in the tail bucket
  reverse KL   P_j (d_b(j) - KL) / T,  d_b = log P_b - log Q_b, P_j the probability of j inside its bucket's
               normalisation (p_j for tail-bucket members)
The teacher is a constant (gradient-detached): it never receives a gradient.

The gradient is computed during the forward pass, chunk by chunk over tokens, and written into a buffer
(by default the student's own logits storage, as Liger-Kernel and megatron's CE do), so beyond that buffer
only chunk-sized fp32 temporaries exist: no [tokens, V/tp] fp32 tensor is kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mtpd_megatron.mtpd.collectives import all_gather_cat, all_reduce, global_argmax, tp_size

_TINY = torch.finfo(torch.float32).tiny
_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


@dataclass(frozen=True)
class DistillSpec:
    """What the KL term computes (see module docstring)."""

    topn: int = 10000
    direction: str = "forward"  # forward = KL(teacher || head), reverse = KL(head || teacher)
    mode: str = "renorm"  # renorm | tail
    temperature: float = 1.0

    def full_vocab(self, vocab_size: int) -> bool:
        return self.topn <= 0 or self.topn >= vocab_size


class TeacherStats(NamedTuple):
    """Per-token statistics of the teacher (main head), computed once per micro-batch, shared by all heads."""

    threshold: Tensor  # [T] fp32; tau (-inf when the whole vocabulary is kept)
    log_z_sel: Tensor  # [T] logsumexp of u/T over S
    log_z_all: Tensor  # [T] logsumexp of u/T over the vocabulary
    argmax: Tensor  # [T] int64 global argmax of u

    def __getitem__(self, index):  # slicing every field at once (NamedTuple's own indexing is by field)
        if isinstance(index, slice):
            return TeacherStats(*(field[index] for field in self))
        return tuple.__getitem__(self, index)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 logits; float64 stays float64 (exact tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_chunk_tokens(local_vocab: int) -> int:
    """Tokens per chunk so that one fp32 [chunk, V/tp] temporary is ~128 MiB."""
    return max(1, (32 * 1024 * 1024) // max(local_vocab, 1))


def _topn_threshold(u: Tensor, topn: int, group) -> Tensor:
    """N-th largest value of each row over the sharded vocabulary: local top-k values, gathered, top-N."""
    k_local = min(topn, u.shape[-1])
    local = torch.topk(u, k_local, dim=-1, sorted=False).values
    gathered = all_gather_cat(local, group, dim=-1)
    return torch.topk(gathered, topn, dim=-1, sorted=False).values.min(dim=-1).values


@torch.no_grad()
def teacher_stats(
    teacher: Tensor,
    spec: DistillSpec,
    vocab_size: int,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
) -> TeacherStats:
    """Threshold, log-normalisers and argmax of the teacher logits `teacher` [T, V/tp] (any float dtype)."""
    n_tok = teacher.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(teacher.shape[-1])
    full = spec.full_vocab(vocab_size)
    inv_t = 1.0 / spec.temperature
    cdt = _compute_dtype(teacher)
    out = [torch.empty(n_tok, dtype=cdt, device=teacher.device) for _ in range(3)]
    argmax = torch.empty(n_tok, dtype=torch.long, device=teacher.device)
    for lo in range(0, n_tok, chunk):
        hi = min(lo + chunk, n_tok)
        u = teacher[lo:hi].to(cdt) * inv_t
        tau = torch.full((hi - lo,), -math.inf, dtype=cdt, device=u.device) if full else _topn_threshold(u, spec.topn, group)
        sel = u >= tau.unsqueeze(-1)
        m_all = all_reduce(u.max(dim=-1).values, _MAX, group)
        s_all = torch.exp(u - m_all.unsqueeze(-1))
        sums = torch.stack([s_all.sum(-1), (s_all * sel).sum(-1)])
        all_reduce(sums, _SUM, group)
        out[0][lo:hi] = tau
        out[1][lo:hi] = m_all + torch.log(sums[1].clamp_min(_TINY))
        out[2][lo:hi] = m_all + torch.log(sums[0])
        argmax[lo:hi] = global_argmax(u, vocab_start, group)
    return TeacherStats(threshold=out[0], log_z_sel=out[1], log_z_all=out[2], argmax=argmax)


class HeadOutputs(NamedTuple):
    loss: Tensor  # [T] alpha*CE + beta*T^2*KL, differentiable w.r.t. the student logits
    ce: Tensor  # [T] detached
    kl: Tensor  # [T] detached
    student_argmax: Tensor  # [T] int64 global argmax of the student


def _head_chunk(z_raw: Tensor, u_raw: Tensor, st: TeacherStats, labels: Tensor, vocab_start: int,
                alpha: float, beta: float, spec: DistillSpec, full: bool, group, want_grad: bool):
    """Loss pieces and d(loss)/dz for one chunk of tokens. Returns (ce, kl, grad or None)."""
    inv_t = 1.0 / spec.temperature
    cdt = _compute_dtype(z_raw)
    z = z_raw.to(cdt)
    u = u_raw.to(cdt) * inv_t
    n, v_local = z.shape
    sel = u >= st.threshold.unsqueeze(-1)  # [n, V/tp]; all True when the whole vocabulary is kept
    tail = spec.mode == "tail" and not full

    # --- maxima (one all-reduce) -------------------------------------------------------------------------
    zt = z * inv_t if spec.temperature != 1.0 else z
    neg_inf = torch.tensor(-math.inf, dtype=cdt, device=z.device)
    maxes = torch.stack([z.max(-1).values, torch.where(sel, zt, neg_inf).max(-1).values])
    all_reduce(maxes, _MAX, group)
    m_all, m_sel = maxes[0], maxes[1]

    # --- sums (one all-reduce) ---------------------------------------------------------------------------
    e = torch.exp(z - m_all.unsqueeze(-1))  # softmax numerators at T = 1 (CE)
    e_t = e if spec.temperature == 1.0 else torch.exp(zt - (m_all * inv_t).unsqueeze(-1))
    e_sel = torch.exp(zt - m_sel.unsqueeze(-1)) * sel
    local_label = labels - vocab_start
    in_shard = (local_label >= 0) & (local_label < v_local)
    safe_label = local_label.clamp(0, v_local - 1)
    z_label = torch.where(in_shard, z.gather(-1, safe_label.unsqueeze(-1)).squeeze(-1), torch.zeros_like(m_all))
    sums = torch.stack([e.sum(-1), e_t.sum(-1), e_sel.sum(-1), (e_t * ~sel).sum(-1), z_label])
    all_reduce(sums, _SUM, group)
    sum_all, sum_all_t, sum_sel, sum_tail_t, z_label = sums
    lse = m_all + torch.log(sum_all)
    ce = lse - z_label

    # --- bucket log-probabilities -----------------------------------------------------------------------
    if tail:
        lse_t = m_all * inv_t + torch.log(sum_all_t)
        log_p = zt - lse_t.unsqueeze(-1)
        log_q = u - st.log_z_all.unsqueeze(-1)
        log_pt = m_all * inv_t + torch.log(sum_tail_t.clamp_min(_TINY)) - lse_t
        q_tail = (1.0 - torch.exp(st.log_z_sel - st.log_z_all)).clamp_min(0.0)
        log_qt = torch.log(q_tail.clamp_min(_TINY))
    else:
        log_p = zt - (m_sel + torch.log(sum_sel)).unsqueeze(-1)
        log_q = u - st.log_z_sel.unsqueeze(-1)
    p = torch.where(sel, torch.exp(log_p), torch.zeros_like(log_p))  # bucket probabilities of S members
    q = torch.where(sel, torch.exp(log_q), torch.zeros_like(log_q))
    d = torch.where(sel, log_p - log_q, torch.zeros_like(log_p))  # log P - log Q on S

    # --- KL (one all-reduce) -----------------------------------------------------------------------------
    if spec.direction == "forward":
        kl_local = -(q * d).sum(-1)
    else:
        kl_local = (p * d).sum(-1)
    kl = all_reduce(kl_local, _SUM, group)
    if tail:  # the tail bucket is one scalar per token, known on every rank: added after the reduction
        p_t = torch.exp(log_pt)
        if spec.direction == "forward":
            kl = kl + q_tail * (log_qt - log_pt)
        else:
            kl = kl + p_t * (log_pt - log_qt)

    grad = None
    if want_grad:
        # CE: p - onehot
        grad = e / sum_all.unsqueeze(-1)
        grad *= alpha
        onehot_rows = torch.nonzero(in_shard, as_tuple=True)[0]
        grad[onehot_rows, safe_label[onehot_rows]] -= alpha
        if beta != 0.0:
            c = beta * spec.temperature  # beta * T^2 * (1/T)
            if spec.direction == "forward":
                g_kl = p - q
                if tail:
                    p_full_tail = torch.where(sel, torch.zeros_like(e_t), e_t / sum_all_t.unsqueeze(-1))
                    ratio = (q_tail / p_t.clamp_min(_TINY)).unsqueeze(-1)
                    g_kl = g_kl + p_full_tail * (1.0 - ratio)
            else:
                g_kl = p * (d - kl.unsqueeze(-1))
                if tail:
                    p_full_tail = torch.where(sel, torch.zeros_like(e_t), e_t / sum_all_t.unsqueeze(-1))
                    g_kl = g_kl + p_full_tail * (log_pt - log_qt - kl).unsqueeze(-1)
            grad += c * g_kl
    return ce, kl, grad


class _FusedCEKL(torch.autograd.Function):
    """Per-token alpha*CE + beta*T^2*KL; the gradient is formed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, stats_tensors, labels, vocab_start, alpha, beta, spec, vocab_size,
                group, chunk_tokens, inplace_grad, want_grad):
        st = TeacherStats(*stats_tensors)
        n_tok = student.shape[0]
        full = spec.full_vocab(vocab_size)
        chunk = chunk_tokens or default_chunk_tokens(student.shape[-1])
        ce = torch.empty(n_tok, dtype=_compute_dtype(student), device=student.device)
        kl = torch.empty_like(ce)
        argmax = torch.empty(n_tok, dtype=torch.long, device=student.device)
        grad_buf = None
        if want_grad:
            grad_buf = student if inplace_grad else torch.empty_like(student)
        for lo in range(0, n_tok, chunk):
            hi = min(lo + chunk, n_tok)
            z_chunk = student[lo:hi]
            argmax[lo:hi] = global_argmax(z_chunk, vocab_start, group)
            ce_c, kl_c, g_c = _head_chunk(z_chunk, teacher[lo:hi], st[lo:hi], labels[lo:hi], vocab_start,
                                          alpha, beta, spec, full, group, want_grad)
            ce[lo:hi] = ce_c
            kl[lo:hi] = kl_c
            if want_grad:
                grad_buf[lo:hi] = g_c.to(grad_buf.dtype)  # may overwrite the logits we just read
        ctx.save_for_backward(grad_buf if want_grad else None)
        ctx.mark_non_differentiable(ce, kl, argmax)
        loss = alpha * ce + (beta * spec.temperature**2) * kl
        return loss, ce, kl, argmax

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad_buf,) = ctx.saved_tensors
        if grad_buf is None:
            raise RuntimeError("MTP-D loss: backward through a forward run without gradients")
        grad = grad_buf.mul_(grad_loss.unsqueeze(-1).to(grad_buf.dtype))
        return (grad,) + (None,) * 12


def head_loss(
    student: Tensor,
    teacher: Tensor,
    stats: TeacherStats,
    labels: Tensor,
    *,
    alpha: float,
    beta: float,
    spec: DistillSpec,
    vocab_size: int,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
    inplace_grad: bool = False,
) -> HeadOutputs:
    """MTP-D loss of one head on vocab-sharded logits.

    student: [T, V/tp] logits of the head (requires grad for training); teacher: [T, V/tp] main-head logits
    at the aligned positions (treated as a constant); stats: `teacher_stats(teacher)` rows; labels: [T]
    global token ids. With `inplace_grad` the student's storage is reused for its gradient (the caller must
    not read the logits afterwards). Returns per-token loss (differentiable) and detached CE, KL, argmax.
    """
    if not (spec.temperature > 0):
        raise ValueError("temperature must be > 0")
    want_grad = torch.is_grad_enabled() and student.requires_grad
    loss, ce, kl, argmax = _FusedCEKL.apply(
        student, teacher.detach(), tuple(stats), labels, vocab_start, float(alpha), float(beta), spec,
        vocab_size, group, chunk_tokens, inplace_grad, want_grad,
    )
    return HeadOutputs(loss=loss, ce=ce, kl=kl, student_argmax=argmax)


def vocab_shard(vocab_size: int, group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(start, size) of this rank's vocabulary shard (megatron's VocabUtility split)."""
    world = tp_size(group)
    rank = 0 if world == 1 else dist.get_rank(group)
    per = vocab_size // world
    return rank * per, per
