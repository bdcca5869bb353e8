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
  TV           1/2 sum_b |P_b - Q_b|                            (total variation; 1 - TV is the acceptance
                                                                 rate of speculative sampling)
  divergence   D = KL (objective "kl"), or D = lambda KL + (1 - lambda) TV (objective "lk": the LK loss of
               arXiv 2602.23881, which targets acceptance directly)
  loss         alpha * CE(z, label) + beta * T^2 * D           (T^2 keeps gradient scale temperature-free)

Gradients w.r.t. z_j (derived in docs/design.md, checked against a float64 autograd reference in tests):
  CE           p_j - 1[j = label]                    with p = softmax(z)
  forward KL   (P_j - R_j) / T,   R_j = Q_j for j in S; R_j = Q_t * p_j / P_t for j in the tail bucket
  reverse KL   P_j (d_b(j) - KL) / T,  d_b = log P_b - log Q_b, P_j the probability of j inside its bucket's
               normalisation (p_j for tail-bucket members)
  TV           P_j (s_b(j) - E_P[s]) / (2T),  s_b = sign(P_b - Q_b), E_P[s] = sum_b P_b s_b
The teacher is normally a constant (gradient-detached: the paper's stop-gradient). Only for the seesaw
ablation (`teacher_grad=True`) does it get the gradient w.r.t. u_j (Q_j = teacher probability of j inside
its bucket's normalisation, q_j for tail members; the TopN set is piecewise constant in u):
  forward KL   Q_j (-d_b(j) - KL) / T
  reverse KL   -(P_b(j) Q_j / Q_b(j) - Q_j) / T         (= -(P_j - Q_j) / T on S)
  TV           -Q_j (s_b(j) - E_Q[s]) / (2T)

The gradient is computed during the forward pass, chunk by chunk over tokens, and written into a buffer
(by default the student's own logits storage, as Liger-Kernel and megatron's CE do), so beyond that buffer
only chunk-sized fp32 temporaries exist: no [tokens, V/tp] fp32 tensor is kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mtpd_megatron.mtpd.collectives import all_gather_cat, all_reduce, combine_argmax, tp_size

_TINY = torch.finfo(torch.float32).tiny
_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


@dataclass(frozen=True)
class DistillSpec:
    """What the KL term computes (see module docstring)."""

    topn: int = 10000
    direction: str = "forward"  # forward = KL(teacher || head), reverse = KL(head || teacher)
    mode: str = "renorm"  # renorm | tail
    temperature: float = 1.0
    objective: str = "kl"  # kl | lk (lambda KL + (1 - lambda) TV)
    lk_lambda: float = 0.5
    compile: bool = True  # torch.compile the chunk stages on CUDA (mtp.mtpd.compile); CPU is always eager
    chunk_elems: Optional[int] = None  # logits per chunk (mtp.mtpd.chunk_elems); None = by device

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


def default_chunk_tokens(local_vocab: int, on_cuda: bool = False, spec: Optional[DistillSpec] = None) -> int:
    """Tokens per chunk, a multiple of 16 (aligned chunk starts: compiled stages see one input layout).

    Eager (CPU) stages materialise fp32 [chunk, V/tp] temporaries: 32M logits (128 MiB each). Compiled CUDA
    stages keep temporaries in registers, so chunks are larger (256M logits): fewer launches and collectives;
    measured on H200 (docs/benchmarks.md) 256M was faster than 128M and far faster than 32M.
    `spec.chunk_elems` (mtp.mtpd.chunk_elems) overrides the element budget.
    """
    spec = spec or DistillSpec()
    default = 256 * 1024 * 1024 if on_cuda and spec.compile else 32 * 1024 * 1024
    elems = spec.chunk_elems or default
    return max(16, (elems // max(local_vocab, 1)) // 16 * 16)


def _topn_threshold(u_raw: Tensor, topn: int, group) -> Tensor:
    """N-th largest raw logit of each row over the sharded vocabulary: local top-k values, gathered, top-N.

    Selection works on the raw logits (temperature does not change the order), in their own dtype: bf16
    values are exact in fp32, so the comparison `u >= tau` is exact whatever the compute dtype.
    """
    k_local = min(topn, u_raw.shape[-1])
    local = torch.topk(u_raw, k_local, dim=-1, sorted=False).values
    gathered = all_gather_cat(local, group, dim=-1)
    return torch.topk(gathered, topn, dim=-1, sorted=False).values.amin(dim=-1).to(_compute_dtype(u_raw))


def _teacher_max(u_raw: Tensor):
    u = u_raw.to(_compute_dtype(u_raw))
    values, idx = u.max(dim=-1)
    return values, idx


def _teacher_sums(u_raw: Tensor, tau: Tensor, m_all: Tensor, inv_t: float) -> Tensor:
    u = u_raw.to(_compute_dtype(u_raw))
    e = torch.exp((u - m_all.unsqueeze(-1)) * inv_t)
    sel = u >= tau.unsqueeze(-1)
    return torch.stack([e.sum(-1), torch.where(sel, e, torch.zeros_like(e)).sum(-1)])


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
    chunk = chunk_tokens or default_chunk_tokens(teacher.shape[-1], teacher.is_cuda, spec)
    full = spec.full_vocab(vocab_size)
    inv_t = 1.0 / spec.temperature
    cdt = _compute_dtype(teacher)
    cuda = teacher.is_cuda and spec.compile
    out = [torch.empty(n_tok, dtype=cdt, device=teacher.device) for _ in range(3)]
    argmax = torch.empty(n_tok, dtype=torch.long, device=teacher.device)
    for lo in range(0, n_tok, chunk):
        hi = min(lo + chunk, n_tok)
        u_raw = teacher[lo:hi]
        if full:
            tau = torch.full((hi - lo,), -math.inf, dtype=cdt, device=u_raw.device)
        else:
            tau = _topn_threshold(u_raw, spec.topn, group)
        m_local, idx = _stage("teacher_max", cuda)(u_raw)
        argmax[lo:hi] = combine_argmax(m_local, idx, vocab_start, group)
        m_all = all_reduce(m_local.clone(), _MAX, group)
        sums = all_reduce(_stage("teacher_sums", cuda)(u_raw, tau, m_all, inv_t), _SUM, group)
        out[0][lo:hi] = tau
        sum_all, sum_sel = sums
        out[1][lo:hi] = m_all * inv_t + torch.log(sum_sel.clamp_min(_TINY))
        out[2][lo:hi] = m_all * inv_t + torch.log(sum_all)
    return TeacherStats(threshold=out[0], log_z_sel=out[1], log_z_all=out[2], argmax=argmax)


class HeadOutputs(NamedTuple):
    loss: Tensor  # [T] alpha*CE + beta*T^2*D, differentiable w.r.t. the student logits
    ce: Tensor  # [T] detached
    kl: Tensor  # [T] detached divergence D (the KL; LK's lambda KL + (1 - lambda) TV with objective "lk")
    student_argmax: Tensor  # [T] int64 global argmax of the student


# ----------------------------------------------------------------------------------------------------------
# Row-wise stages. Each is a pure function of one chunk (one pass over the [n, V/tp] logits); the collectives
# sit between them. On CUDA they are compiled with torch.compile so each stage becomes one or two fused
# kernels: the forward direction then reads the logits three times and writes the gradient once.
# ----------------------------------------------------------------------------------------------------------


def _prepare(z_raw: Tensor, u_raw: Tensor, tau: Tensor, inv_t: float):
    cdt = _compute_dtype(z_raw)
    z = z_raw.to(cdt)
    u_unscaled = u_raw.to(cdt)
    sel = u_unscaled >= tau.unsqueeze(-1)  # teacher's TopN set (raw logits); all True for the full vocabulary
    return z, u_unscaled * inv_t, z * inv_t, sel


def _stage_maxes(z_raw, u_raw, tau, inv_t: float):
    """Row maxima of z and of z/T over S (to be MAX-reduced) and the local argmax of z (for acceptance)."""
    z, u, zt, sel = _prepare(z_raw, u_raw, tau, inv_t)
    z_max, z_idx = z.max(-1)
    return torch.stack([z_max, torch.where(sel, zt, torch.full_like(zt, -math.inf)).amax(-1)]), z_idx


def _stage_sums(z_raw, u_raw, tau, maxes, local_label, inv_t: float) -> Tensor:
    z, u, zt, sel = _prepare(z_raw, u_raw, tau, inv_t)
    m_all, m_sel = maxes[0].unsqueeze(-1), maxes[1].unsqueeze(-1)
    e = torch.exp(z - m_all)
    e_t = torch.exp(zt - m_all * inv_t)
    e_sel = torch.where(sel, torch.exp(zt - m_sel), torch.zeros_like(zt))
    cols = torch.arange(z.shape[-1], device=z.device)
    z_label = torch.where(cols == local_label.unsqueeze(-1), z, torch.zeros_like(z)).sum(-1)
    tail_t = torch.where(sel, torch.zeros_like(e_t), e_t)
    return torch.stack([e.sum(-1), e_t.sum(-1), e_sel.sum(-1), tail_t.sum(-1), z_label])


class StudentSums(NamedTuple):
    """Per-row sums over the vocabulary of one chunk of the student (head), all-reduced as one stacked tensor."""

    all: Tensor  # sum exp(z - m_all)
    all_t: Tensor  # sum exp(z/T - m_all/T)
    sel: Tensor  # sum over S of exp(z/T - m_sel)
    tail_t: Tensor  # sum outside S of exp(z/T - m_all/T)
    z_label: Tensor  # the label's logit (0 on ranks without it)


class RowTerms(NamedTuple):
    """Per-row normalisers of one chunk. In tail mode P and Q are normalised over the whole vocabulary."""

    lse: Tensor  # logsumexp of z (the CE)
    log_norm_p: Tensor  # log-normaliser of P (student) on S; tail: of z/T over the vocabulary
    log_norm_q: Tensor  # log-normaliser of Q (teacher) on S; tail: log Z_all
    log_pt: Optional[Tensor]  # tail: log P of the tail bucket
    log_qt: Optional[Tensor]  # tail: log Q of the tail bucket
    q_tail: Optional[Tensor]  # tail: Q of the tail bucket


def _row_terms(maxes, sums: StudentSums, log_z_sel, log_z_all, inv_t: float, tail: bool) -> RowTerms:
    """Per-row normalisers (RowTerms) from the chunk's maxima and all-reduced sums."""
    m_all, m_sel = maxes[0], maxes[1]
    lse = m_all + torch.log(sums.all)
    if tail:
        lse_t = m_all * inv_t + torch.log(sums.all_t)
        log_pt = m_all * inv_t + torch.log(sums.tail_t.clamp_min(_TINY)) - lse_t
        q_tail = (1.0 - torch.exp(log_z_sel - log_z_all)).clamp_min(0.0)
        return RowTerms(lse, lse_t, log_z_all, log_pt, torch.log(q_tail.clamp_min(_TINY)), q_tail)
    return RowTerms(lse, m_sel + torch.log(sums.sel), log_z_sel, None, None, None)


def _bucket_logs(z_raw, u_raw, tau, terms, inv_t: float):
    z, u, zt, sel = _prepare(z_raw, u_raw, tau, inv_t)
    log_p = zt - terms.log_norm_p.unsqueeze(-1)
    log_q = u - terms.log_norm_q.unsqueeze(-1)
    zero = torch.zeros_like(log_p)
    p = torch.where(sel, torch.exp(log_p), zero)  # bucket probabilities of the S members
    q = torch.where(sel, torch.exp(log_q), zero)
    d = torch.where(sel, log_p - log_q, zero)  # log P - log Q on S
    return z, zt, u, sel, p, q, d


def _ce_grad(z, terms, local_label, alpha: float):
    cols = torch.arange(z.shape[-1], device=z.device)
    softmax = torch.exp(z - terms.lse.unsqueeze(-1))
    return alpha * (softmax - (cols == local_label.unsqueeze(-1)).to(z.dtype))


def _tail_members(zt, sel, terms):
    """softmax(z/T)_j for j outside S (the tail bucket's members), 0 on S."""
    return torch.where(sel, torch.zeros_like(zt), torch.exp(zt - terms.log_norm_p.unsqueeze(-1)))


def _stage_kl_forward(
    z_raw, u_raw, tau, terms, local_label, inv_t: float, alpha: float, c: float, tail: bool, dest: Optional[Tensor]
):
    """Forward KL's local partial sum and (it needs no global KL) the chunk's gradient, written into `dest`.

    `dest` may be `z_raw` itself (the gradient replaces the logits): every element's gradient depends only
    on its own logit and per-row scalars, so the in-place write is safe even inside one fused kernel.
    """
    z, zt, _, sel, p, q, d = _bucket_logs(z_raw, u_raw, tau, terms, inv_t)
    kl_local = -(q * d).sum(-1)
    if dest is not None:
        g = p - q
        if tail:
            g = g + _tail_members(zt, sel, terms) * (
                1.0 - terms.q_tail / torch.exp(terms.log_pt).clamp_min(_TINY)
            ).unsqueeze(-1)
        dest.copy_(_ce_grad(z, terms, local_label, alpha) + c * g)
    return kl_local


def _tail_teacher(u, sel, terms):
    """softmax(u/T)_j for j outside S (the teacher's tail-bucket members), 0 on S (tail mode: terms.log_norm_q = log Z_all)."""
    return torch.where(sel, torch.zeros_like(u), torch.exp(u - terms.log_norm_q.unsqueeze(-1)))


def _stage_div_sums(z_raw, u_raw, tau, terms, inv_t: float, reverse: bool, with_tv: bool):
    """Local partial sums over S: [KL part, sum |P - Q|, sum s P, sum s Q] (s = sign(P - Q)), to be SUM-reduced."""
    z, zt, u, sel, p, q, d = _bucket_logs(z_raw, u_raw, tau, terms, inv_t)
    kl_local = (p * d).sum(-1) if reverse else -(q * d).sum(-1)
    if not with_tv:
        return torch.stack(
            [kl_local, torch.zeros_like(kl_local), torch.zeros_like(kl_local), torch.zeros_like(kl_local)]
        )
    s = torch.sign(p - q)
    return torch.stack([kl_local, (p - q).abs().sum(-1), (s * p).sum(-1), (s * q).sum(-1)])


def _stage_div_grad(
    z_raw,
    u_raw,
    tau,
    terms,
    scalars,
    local_label,
    inv_t: float,
    alpha: float,
    c: float,
    tail: bool,
    reverse: bool,
    w_kl: float,
    w_tv: float,
    dest: Optional[Tensor],
    teacher_dest: Optional[Tensor],
) -> None:
    """Gradient of alpha*CE + c*T*(w_kl KL + w_tv TV) w.r.t. the student (into `dest`) and, for the seesaw
    ablation, w.r.t. the teacher (into `teacher_dest`). `scalars` = [KL, E_P[s], E_Q[s], s_t] per row (global)."""
    z, zt, u, sel, p, q, d = _bucket_logs(z_raw, u_raw, tau, terms, inv_t)
    kl, e_p, e_q, s_t = (x.unsqueeze(-1) for x in scalars)
    s = torch.sign(p - q)
    if tail:
        log_pt, log_qt = terms.log_pt.unsqueeze(-1), terms.log_qt.unsqueeze(-1)
        p_tail, q_tail = _tail_members(zt, sel, terms), _tail_teacher(u, sel, terms)
    if dest is not None:
        g = w_kl * (p * (d - kl) if reverse else p - q)
        if w_tv:
            g = g + (0.5 * w_tv) * torch.where(sel, p * (s - e_p), torch.zeros_like(p))
        if tail:
            pt, qt = torch.exp(log_pt), torch.exp(log_qt)
            g_t = w_kl * (log_pt - log_qt - kl if reverse else 1.0 - qt / pt.clamp_min(_TINY))
            if w_tv:
                g_t = g_t + (0.5 * w_tv) * (s_t - e_p)
            g = g + p_tail * g_t
        dest.copy_(_ce_grad(z, terms, local_label, alpha) + c * g)
    if teacher_dest is not None:
        h = w_kl * ((q - p) if reverse else q * (-d - kl))
        if w_tv:
            h = h - (0.5 * w_tv) * torch.where(sel, q * (s - e_q), torch.zeros_like(q))
        if tail:
            pt, qt = torch.exp(log_pt), torch.exp(log_qt)
            h_t = w_kl * (1.0 - pt / qt.clamp_min(_TINY) if reverse else log_qt - log_pt - kl)
            if w_tv:
                h_t = h_t - (0.5 * w_tv) * (s_t - e_q)
            h = h + q_tail * h_t
        teacher_dest.copy_(c * h)


_STAGES = dict(
    teacher_max=_teacher_max,
    teacher_sums=_teacher_sums,
    maxes=_stage_maxes,
    sums=_stage_sums,
    kl_forward=_stage_kl_forward,
    div_sums=_stage_div_sums,
    div_grad=_stage_div_grad,
)
_COMPILED: dict = {}


def _stage(name: str, compiled: bool):
    """The stage function, compiled when `compiled` (CUDA with mtp.mtpd.compile); eager otherwise (CPU: exact
    tests)."""
    if not compiled:
        return _STAGES[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_STAGES[name], dynamic=True)
    return _COMPILED[name]


def _head_chunk(
    z_raw: Tensor,
    u_raw: Tensor,
    st: TeacherStats,
    labels: Tensor,
    vocab_start: int,
    alpha: float,
    beta: float,
    spec: DistillSpec,
    full: bool,
    group,
    dest: Optional[Tensor],
    teacher_dest: Optional[Tensor] = None,
):
    """One chunk of tokens: returns (ce, divergence, global student argmax); writes d(loss)/dz into `dest`
    and, when given, d(loss)/du into `teacher_dest`."""
    inv_t = 1.0 / spec.temperature
    tail = spec.mode == "tail" and not full
    cuda = z_raw.is_cuda and spec.compile  # compile the stages
    local_label = labels - vocab_start  # outside [0, V/tp) on ranks that do not hold the label
    tau = st.threshold

    maxes, z_idx = _stage("maxes", cuda)(z_raw, u_raw, tau, inv_t)
    argmax = combine_argmax(maxes[0], z_idx, vocab_start, group)
    all_reduce(maxes, _MAX, group)
    sums = StudentSums(*all_reduce(_stage("sums", cuda)(z_raw, u_raw, tau, maxes, local_label, inv_t), _SUM, group))
    terms = _row_terms(maxes, sums, st.log_z_sel, st.log_z_all, inv_t, tail)
    ce = terms.lse - sums.z_label
    c = beta * spec.temperature  # beta * T^2 * (1/T)
    lk = spec.objective == "lk"
    if spec.direction == "forward" and not lk and teacher_dest is None:
        # The common case in one pass: forward KL's gradient needs no global KL value.
        kl = all_reduce(
            _stage("kl_forward", cuda)(z_raw, u_raw, tau, terms, local_label, inv_t, alpha, c, tail, dest), _SUM, group
        )
        if tail:  # the tail bucket is one scalar per token, known on every rank: added after the reduction
            kl = kl + terms.q_tail * (terms.log_qt - terms.log_pt)
        return ce, kl, argmax
    reverse = spec.direction == "reverse"
    part = all_reduce(_stage("div_sums", cuda)(z_raw, u_raw, tau, terms, inv_t, reverse, lk), _SUM, group)
    kl, tv_abs, e_p, e_q = part[0], part[1], part[2], part[3]
    s_t = torch.zeros_like(kl)
    if tail:  # the tail bucket's scalars, known on every rank: added after the reduction
        log_pt, log_qt, q_t = terms.log_pt, terms.log_qt, terms.q_tail
        p_t = torch.exp(log_pt)
        kl = kl + (p_t * (log_pt - log_qt) if reverse else q_t * (log_qt - log_pt))
        if lk:
            s_t = torch.sign(p_t - q_t)
            tv_abs, e_p, e_q = tv_abs + (p_t - q_t).abs(), e_p + s_t * p_t, e_q + s_t * q_t
    w_kl, w_tv = (spec.lk_lambda, 1.0 - spec.lk_lambda) if lk else (1.0, 0.0)
    if dest is not None or teacher_dest is not None:
        _stage("div_grad", cuda)(
            z_raw,
            u_raw,
            tau,
            terms,
            torch.stack([kl, e_p, e_q, s_t]),
            local_label,
            inv_t,
            alpha,
            c,
            tail,
            reverse,
            w_kl,
            w_tv,
            dest,
            teacher_dest,
        )
    return ce, w_kl * kl + w_tv * 0.5 * tv_abs, argmax


class _FusedCEKL(torch.autograd.Function):
    """Per-token alpha*CE + beta*T^2*D; the gradients are formed in forward and scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        student,
        teacher,
        stats_tensors,
        labels,
        vocab_start,
        alpha,
        beta,
        spec,
        vocab_size,
        group,
        chunk_tokens,
        inplace_grad,
        want_grad,
        teacher_grad,
        teacher_offsets,
    ):
        st = TeacherStats(*stats_tensors)
        n_tok = student.shape[0]
        full = spec.full_vocab(vocab_size)
        chunk = chunk_tokens or default_chunk_tokens(student.shape[-1], student.is_cuda, spec)
        ce = torch.empty(n_tok, dtype=_compute_dtype(student), device=student.device)
        kl = torch.empty_like(ce)
        argmax = torch.empty(n_tok, dtype=torch.long, device=student.device)
        grad_buf = None
        if want_grad:
            grad_buf = student if inplace_grad else torch.empty_like(student)
        # the teacher is shared: never in place; with offsets some of its rows are nobody's teacher (zero grad)
        teacher_buf = None
        if teacher_grad:
            teacher_buf = torch.empty_like(teacher) if teacher_offsets is None else torch.zeros_like(teacher)
        pieces = ((0, n_tok, 0),) if teacher_offsets is None else teacher_offsets
        for p_lo, p_hi, off in pieces:  # student rows [p_lo, p_hi) are taught by teacher rows shifted by off
            for lo in range(p_lo, p_hi, chunk):
                hi = min(lo + chunk, p_hi)
                z_chunk = student[lo:hi]
                dest = None if grad_buf is None else (z_chunk if inplace_grad else grad_buf[lo:hi])
                ce[lo:hi], kl[lo:hi], argmax[lo:hi] = _head_chunk(
                    z_chunk,
                    teacher[lo + off : hi + off],
                    st[lo + off : hi + off],
                    labels[lo:hi],
                    vocab_start,
                    alpha,
                    beta,
                    spec,
                    full,
                    group,
                    dest,
                    None if teacher_buf is None else teacher_buf[lo + off : hi + off],
                )
        ctx.teacher_offsets = teacher_offsets
        ctx.save_for_backward(grad_buf if want_grad else None, teacher_buf)
        ctx.mark_non_differentiable(ce, kl, argmax)
        loss = alpha * ce + (beta * spec.temperature**2) * kl
        return loss, ce, kl, argmax

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_buf, teacher_buf = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1)
        grad = None
        if grad_buf is not None:
            grad = grad_buf.mul_(scale.to(grad_buf.dtype))
        elif ctx.needs_input_grad[0]:
            raise RuntimeError("MTP-D loss: backward through a forward run without gradients")
        teacher = None
        if teacher_buf is not None:
            if ctx.teacher_offsets is None:
                teacher = teacher_buf.mul_(scale.to(teacher_buf.dtype))
            else:  # the per-token scale, moved to the teacher rows each token learnt from
                for lo, hi, off in ctx.teacher_offsets:
                    teacher_buf[lo + off : hi + off].mul_(scale[lo:hi].to(teacher_buf.dtype))
                teacher = teacher_buf
        return (grad, teacher) + (None,) * 13


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
    teacher_grad: bool = False,
    teacher_offsets: Optional[Sequence[tuple[int, int, int]]] = None,
) -> HeadOutputs:
    """MTP-D loss of one head on vocab-sharded logits.

    student: [T, V/tp] logits of the head (requires grad for training); teacher: [T, V/tp] main-head logits
    at the aligned positions; stats: `teacher_stats(teacher)` rows; labels: [T] global token ids. With
    `inplace_grad` the student's storage is reused for its gradient (the caller must not read the logits
    afterwards). The teacher is a constant unless `teacher_grad` (the seesaw ablation: the divergence's
    gradient also flows into the teacher's logits, hence into the main head). `teacher_offsets`
    [(lo, hi, offset)] (context parallelism, parallel/context.py) says that student rows [lo, hi) are taught
    by teacher rows [lo+offset, hi+offset) — `teacher` and `stats` then hold the extended teacher's rows,
    and the pieces must cover every student row; without it row t is taught by row t. Returns per-token loss
    (differentiable) and detached CE, divergence (the KL, or LK's lambda KL + (1 - lambda) TV) and argmax.
    """
    if not (spec.temperature > 0):
        raise ValueError("temperature must be > 0")
    if spec.objective not in ("kl", "lk") or not 0.0 <= spec.lk_lambda <= 1.0:
        raise ValueError(
            f"objective {spec.objective!r} / lk_lambda {spec.lk_lambda}: expected kl|lk and 0 <= lambda <= 1"
        )
    grad_on = torch.is_grad_enabled()
    want_grad = grad_on and student.requires_grad
    teacher_grad = bool(teacher_grad and grad_on and teacher.requires_grad and beta != 0.0)
    loss, ce, kl, argmax = _FusedCEKL.apply(
        student,
        teacher if teacher_grad else teacher.detach(),
        tuple(stats),
        labels,
        vocab_start,
        float(alpha),
        float(beta),
        spec,
        vocab_size,
        group,
        chunk_tokens,
        inplace_grad,
        want_grad,
        teacher_grad,
        None if teacher_offsets is None else tuple(tuple(int(x) for x in piece) for piece in teacher_offsets),
    )
    return HeadOutputs(loss=loss, ce=ce, kl=kl, student_argmax=argmax)


def vocab_shard(vocab_size: int, group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(start, size) of this rank's vocabulary shard (megatron's VocabUtility split)."""
    world = tp_size(group)
    rank = 0 if world == 1 else dist.get_rank(group)
    per = vocab_size // world
    return rank * per, per
