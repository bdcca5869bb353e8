"""The one hook into megatron-core: MTP-D replaces `process_mtp_loss` for models that opt in.

megatron-core 0.19.2 computes the MTP heads' losses in `process_mtp_loss`
(transformer/multi_token_prediction.py:760), imported by name into models/gpt/gpt_model.py (called at :701)
and models/hybrid/hybrid_model.py (:573). `install()` rebinds that name in both modules to
`mtpd_process_mtp_loss`, which falls through to megatron's original for every model whose
TransformerConfig was not `attach()`-ed — so plain megatron MTP is untouched.

For an attached model, per micro-batch:
  1. teacher = output_layer(h0.detach()) under no_grad: the main head's logits [s, b, V/tp], computed once;
     its TopN threshold, log-normalisers and argmax are computed once and shared by all heads.
  2. head k's logits [s, b, V/tp] (the shared output layer, vocab-parallel, never gathered) are compared at
     position t with the teacher at t+k: slices logits[:s-k] and teacher[k:], no copy and no roll of hidden
     states (under sequence parallelism the output layer has already gathered the sequence, so the slices
     are along the full local sequence).
  3. labels and loss mask are rolled with megatron's `roll_tensor` exactly as megatron does (so packed
     sequences mask positions whose target lies in the next document: no CE and no KL across documents);
     the loss rides on the hidden states through megatron's `MTPLossAutoScaler`, scaled by
     mtp_loss_scaling_factor / num_heads like megatron's own MTP loss (docs/design.md, "Loss scaling").
Context parallelism: each CP rank holds two chunks of the sequence, so the teacher at t+k may live on a
neighbouring rank. `parallel.context.Lookahead` appends to each local chunk the first num_heads teacher rows
of the chunk that follows it (one neighbour exchange per micro-batch, not per head), and head k's teacher for
each chunk is again a view; the token counts are summed over the CP group and the loss is scaled by CP (DDP
averages gradients over DP x CP). At CP = 1 nothing of this runs. Pipeline parallelism works because this
runs on the stage holding the MTP block and the output layer (the last).

Two ablation switches change where the KL's gradient goes (docs/design.md, "Where the KL gradient goes"):
  * `detach_teacher=False` (the paper's seesaw ablation): the teacher logits keep their graph, so the KL
    also pulls the main head (and the trunk below it) towards the heads.
  * `kl_to_trunk=False` (trunk guard): the KL trains the heads but nothing they share with the main head.
    A forward hook on megatron's MTP block runs the block a second time on the detached decoder output with
    detached embeddings; the KL is computed on that pass (and with the output weight detached), the CE on
    megatron's own pass. Costs one more forward/backward of the heads.

Two cost switches dispatch into mtpd/fused_head.py (same loss and gradients): `fused_output_layer` computes a
head's output layer + loss chunk by chunk with the gradients formed in the forward (no [tokens, V] logits of
a head kept for backward); `share_teacher_logits` computes the main logits once for the teacher and megatron's
main loss (the heads' losses then ride on those logits instead of the hidden states).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.models.gpt import gpt_model as _gpt_model
from megatron.core.transformer import multi_token_prediction as _mtp
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, roll_tensor

from mtpd_megatron.mtpd import fused_head
from mtpd_megatron.mtpd.collectives import global_argmax, tp_size
from mtpd_megatron.mtpd.kl import DistillSpec, TeacherStats, head_loss, teacher_stats, vocab_shard
from mtpd_megatron.mtpd.metrics import MTPDMetrics
from mtpd_megatron.parallel.context import Lookahead

_ORIGINAL = _mtp.process_mtp_loss


class GuardedPass:
    """The trunk guard's second pass of the MTP block (on detached trunk inputs), handed from the block's
    forward hook to the loss of the same micro-batch."""

    def __init__(self) -> None:
        self.hidden: Optional[torch.Tensor] = None

    def __call__(self, block, args, kwargs, output):
        if not (block.training and torch.is_grad_enabled()):
            return None
        embedding = kwargs["embedding"]
        detached = dict(
            kwargs, hidden_states=kwargs["hidden_states"].detach(), embedding=lambda **kw: embedding(**kw).detach()
        )
        self.hidden = block.forward(**detached)  # .forward: no hooks, so no recursion
        return None

    def take(self) -> Optional[torch.Tensor]:
        hidden, self.hidden = self.hidden, None
        return hidden


@dataclass(frozen=True)
class MTPDSettings:
    """Per-model MTP-D settings: built by the trainer (`from_config`) and handed to `attach`."""

    spec: DistillSpec
    alphas: tuple
    betas: tuple
    trained: tuple  # per head: False = frozen (looped extension): no loss, metrics only
    detach_teacher: bool = True
    guard: Optional[GuardedPass] = None  # set when the KL must not reach the trunk (kl_to_trunk=False)
    fused_output_layer: bool = False  # mtpd/fused_head.py: heads' output layer + loss over token chunks
    share_teacher_logits: bool = False  # mtpd/fused_head.py: main logits computed once, teacher = their alias

    @classmethod
    def from_config(cls, mtp_cfg, trained: Optional[tuple] = None) -> "MTPDSettings":
        n = mtp_cfg.num_heads
        d = mtp_cfg.mtpd

        def per_head(value, name):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"mtp.mtpd.{name}: {len(values)} values for {n} heads (give one per head)")
            return tuple(float(v) for v in values)

        betas = per_head(d.beta, "beta") if d.enabled else (0.0,) * n
        spec = DistillSpec(
            topn=d.topn,
            direction=d.direction,
            mode=d.mode,
            temperature=d.temperature,
            objective=d.objective,
            lk_lambda=d.lk_lambda,
            compile=d.compile,
            chunk_elems=d.chunk_elems,
        )
        guard = GuardedPass() if d.enabled and not d.kl_to_trunk and not mtp_cfg.detach_heads else None
        return cls(
            spec=spec,
            alphas=per_head(d.alpha, "alpha"),
            betas=betas,
            trained=trained or (True,) * n,
            detach_teacher=d.detach_teacher or not d.enabled,
            guard=guard,
            fused_output_layer=d.fused_output_layer,
            share_teacher_logits=d.share_teacher_logits,
        )


def install() -> None:
    """Route megatron's MTP loss through MTP-D for attached models. Idempotent."""
    _gpt_model.process_mtp_loss = mtpd_process_mtp_loss
    try:
        from megatron.core.models.hybrid import hybrid_model as _hybrid_model
    except ImportError:  # the hybrid model needs optional Mamba dependencies
        return
    _hybrid_model.process_mtp_loss = mtpd_process_mtp_loss


@dataclass
class Attached:
    """What the loss of one attached model uses: its settings and the metrics it adds to (owned by the caller)."""

    settings: MTPDSettings
    metrics: MTPDMetrics


# The models opted in, by their TransformerConfig: megatron calls the loss with the config only, so this is
# where the hook finds the settings and metrics the trainer handed over (nothing is parked on the config).
_ATTACHED: dict[int, tuple] = {}


def attach(config, settings: MTPDSettings, metrics: MTPDMetrics, mtp_block=None) -> Attached:
    """Opt the model whose TransformerConfig is `config` into MTP-D with `settings`; its per-head sums go to
    `metrics`. `mtp_block` (the model's megatron MultiTokenPredictionBlock) is needed by the trunk guard
    (`kl_to_trunk=False`). To change the settings of an attached model, assign `Attached.settings` (keep its
    guard: the forward hook is registered once)."""
    if settings.guard is not None:
        if mtp_block is None:
            raise ValueError("mtp.mtpd.kl_to_trunk=false needs the model's MTP block (pass mtp_block=model.mtp)")
        mtp_block.register_forward_hook(settings.guard, with_kwargs=True)
    entry = Attached(settings, metrics)
    key = id(config)
    _ATTACHED[key] = (weakref.ref(config), entry)
    weakref.finalize(config, _ATTACHED.pop, key, None)
    install()
    return entry


def attached(config) -> Optional[Attached]:
    """The settings and metrics `config`'s model was attached with, or None (plain megatron MTP)."""
    found = _ATTACHED.get(id(config))
    if found is None or found[0]() is not config:
        return None
    return found[1]


def mtpd_process_mtp_loss(
    hidden_states,
    labels,
    loss_mask,
    output_layer,
    output_weight,
    runtime_gather_output,
    is_training,
    compute_language_model_loss,
    config,
    cp_group=None,
    tp_group=None,
    packed_seq_params=None,
    scale_logits_fn=None,
    input_ids=None,
):
    """Drop-in for megatron's process_mtp_loss (same signature and return value)."""
    entry = attached(config)
    if entry is None:
        return _ORIGINAL(
            hidden_states,
            labels,
            loss_mask,
            output_layer,
            output_weight,
            runtime_gather_output,
            is_training,
            compute_language_model_loss,
            config,
            cp_group=cp_group,
            tp_group=tp_group,
            packed_seq_params=packed_seq_params,
            scale_logits_fn=scale_logits_fn,
            input_ids=input_ids,
        )
    settings = entry.settings
    cp = tp_size(cp_group) if cp_group is not None else 1

    num_heads = config.mtp_num_layers
    chunks = torch.chunk(hidden_states, 1 + num_heads, dim=0)
    hidden_states = chunks[0]
    roll = dict(shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
    if labels is None:  # as megatron: derive labels from input_ids (e.g. RL), last position masked
        if input_ids is None:
            return hidden_states
        labels, _ = roll_tensor(input_ids, **roll)
        if loss_mask is None:
            loss_mask = torch.ones_like(labels)
        loss_mask, _ = roll_tensor(loss_mask, **roll)
    if config.mtp_detach_heads:
        output_weight = (output_weight if output_weight is not None else output_layer.weight).detach()
    mtp_labels = labels.clone()
    loss_mask = torch.ones_like(mtp_labels) if loss_mask is None else loss_mask
    original_num_tokens = loss_mask.sum()
    if cp > 1:  # the token counts of the whole sequence (every CP rank holds two chunks of it)
        original_num_tokens = _sum_over(original_num_tokens, cp_group)

    def logits_of(h, weight):
        out, _ = output_layer(h, weight=weight, runtime_gather_output=False)
        return scale_logits_fn(out) if scale_logits_fn is not None else out

    carrier = hidden_states  # what the heads' losses ride on (the main logits when they are shared)
    share = (
        settings.share_teacher_logits
        and settings.detach_teacher
        and scale_logits_fn is None
        and not runtime_gather_output
    )
    if share:  # fused_head.py: the main logits once; the teacher is their detached alias
        carrier = fused_head.main_logits(output_layer, chunks[0], output_weight)
        teacher = carrier.detach()
    elif settings.detach_teacher:
        with torch.no_grad():  # the teacher: main head, gradient-detached (no "seesaw" pull on the main head)
            teacher = logits_of(chunks[0].detach(), None if output_weight is None else output_weight.detach())
    else:  # seesaw ablation: the KL's gradient reaches the main head through the teacher's logits
        teacher = logits_of(chunks[0], output_weight)
    guarded = settings.guard.take() if settings.guard is not None else None
    if guarded is not None:  # the KL's pass: heads on detached trunk inputs, output weight detached
        guarded = torch.chunk(guarded, 1 + num_heads, dim=0)
        kl_weight = (output_weight if output_weight is not None else output_layer.weight).detach()
    seq, batch, v_local = teacher.shape
    vocab_size = v_local * tp_size(tp_group)
    vocab_start, _ = vocab_shard(vocab_size, tp_group)
    lookahead = None
    if cp > 1:  # the teacher rows of each chunk's successor, from the neighbouring CP rank (parallel/context.py)
        lookahead = Lookahead(seq, num_heads, cp_group, packed_seq_params)
        teacher = lookahead.extend(teacher)
    teacher = teacher.reshape(-1, v_local)
    spec = settings.spec
    stats = teacher_stats(teacher.detach(), spec, vocab_size, vocab_start, tp_group)
    tracker: MTPDMetrics = entry.metrics
    chain = torch.ones(seq * batch, dtype=torch.bool, device=teacher.device)  # heads < k all accepted
    scale = config.mtp_loss_scaling_factor / num_heads

    for k in range(1, num_heads + 1):
        mtp_labels, _ = roll_tensor(mtp_labels, **roll)
        loss_mask, num_tokens = roll_tensor(loss_mask, **roll)
        if lookahead is None:
            rows = seq - k  # positions t < s-k have a teacher at t+k: views, teacher[k*batch:]
            aligned = dict(teacher=teacher[k * batch :], stats=stats[k * batch :])
            head_stats = aligned["stats"]
        else:  # CP: every local position has a teacher row in the extended teacher (invalid ones are masked)
            rows = seq
            pieces = lookahead.pieces(k, batch)
            aligned = dict(teacher=teacher, stats=stats, teacher_offsets=pieces)
            head_stats = TeacherStats(*(lookahead.align(field, pieces) for field in stats))
            num_tokens = _sum_over(num_tokens, cp_group)
        n = rows * batch
        if n <= 0:
            break
        head = k - 1
        fused = (
            settings.fused_output_layer
            and settings.trained[head]
            and guarded is None
            and lookahead is None
            and scale_logits_fn is None
            and settings.detach_teacher
        )
        with contextlib.nullcontext() if settings.trained[head] else torch.no_grad():
            logits = None if fused else logits_of(chunks[k], output_weight)
        student = None if fused else logits[:rows].reshape(n, v_local)
        lab = mtp_labels.t()[:rows].reshape(n)
        mask = loss_mask.t()[:rows].reshape(n).to(torch.float64 if teacher.dtype == torch.float64 else torch.float32)
        if settings.trained[head]:
            common = dict(
                spec=spec,
                vocab_size=vocab_size,
                vocab_start=vocab_start,
                group=tp_group,
                inplace_grad=True,
                teacher_grad=not settings.detach_teacher,
                **aligned,
            )
            alpha, beta = settings.alphas[head], settings.betas[head]
            if fused:  # no [tokens, V] logits kept: the weighted loss sum rides on the carrier
                factor = (
                    scale * (original_num_tokens / num_tokens.clamp(min=1))
                    if config.calculate_per_token_loss
                    else scale / num_tokens.clamp(min=1)
                )
                weighted, out = fused_head.head_loss_from_hidden(
                    chunks[k],
                    output_layer,
                    output_weight,
                    rows=rows,
                    labels=lab,
                    row_weights=mask * factor,
                    alpha=alpha,
                    beta=beta,
                    spec=spec,
                    vocab_size=vocab_size,
                    vocab_start=vocab_start,
                    group=tp_group,
                    teacher=aligned["teacher"],
                    stats=aligned["stats"],
                )
                carrier = MTPLossAutoScaler.apply(carrier, weighted)
            elif guarded is None:
                out = head_loss(student, labels=lab, alpha=alpha, beta=beta, **common)
                loss = out.loss
            else:  # CE on megatron's pass (reaches the trunk), KL on the guarded pass (heads only)
                kl_student = logits_of(guarded[k], kl_weight)[:rows].reshape(n, v_local)
                out = head_loss(student, labels=lab, alpha=alpha, beta=0.0, **common)
                kl_out = head_loss(kl_student, labels=lab, alpha=0.0, beta=beta, **common)
                loss = out.loss + kl_out.loss
                out = out._replace(kl=kl_out.kl)
            if not fused:
                mtp_loss = (loss * mask).view(rows, batch)
                if config.calculate_per_token_loss:  # as megatron: renormalise to the unrolled token count
                    mtp_loss = scale * mtp_loss * (original_num_tokens / num_tokens.clamp(min=1))
                elif cp == 1:
                    mtp_loss = scale * mtp_loss / num_tokens.clamp(min=1)
                else:  # the sequence's mean over CP ranks; DDP averages gradients over DP x CP, hence x CP
                    mtp_loss = (scale * cp) * mtp_loss / num_tokens.clamp(min=1)
                carrier = MTPLossAutoScaler.apply(carrier, mtp_loss)
            ce, kl, draft = out.ce, out.kl, out.student_argmax
        else:  # frozen head: its forward feeds the cascade; only its acceptance is measured
            draft = global_argmax(student, vocab_start, tp_group)
            ce = kl = torch.zeros(n, device=student.device)
        valid = mask.to(torch.float64)
        accepted = chain[:n] & (draft == head_stats.argmax)
        mass = torch.exp(head_stats.log_z_sel - head_stats.log_z_all)
        tracker.add(
            head,
            tokens=valid.sum(),
            ce=(ce.double() * valid).sum(),
            kl=(kl.double() * valid).sum(),
            topn_mass=(mass.double() * valid).sum(),
            label_correct=((draft == lab).double() * valid).sum(),
            accept=(accepted.double() * valid).sum(),
            accept_base=(chain[:n].double() * valid).sum(),
        )
        chain = accepted
    if share:  # megatron's main output layer call on hidden_states returns the carrier (fused_head.py)
        fused_head.SharedMainLogits.of(output_layer).put(hidden_states, fused_head.for_main_loss(carrier))
        return hidden_states
    return carrier


def _sum_over(value: torch.Tensor, group) -> torch.Tensor:
    """A detached count summed over `group` (the CP group: the token counts of the whole sequence)."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return total
