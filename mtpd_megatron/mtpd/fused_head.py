"""The MTP heads' cost: output layer + CE + TopN KL fused over token chunks, and the teacher shared with the
main loss. Both are opt-in switches of the MTP-D hook (mtp.mtpd.fused_output_layer, share_teacher_logits).

Fused output layer (`head_loss_from_hidden`). Today each head runs megatron's vocab-parallel output layer on
its hidden states, [tokens, V/tp] logits (V = 122,880 on the 2B preset: 2 GiB of bf16 per head at 8k tokens),
and `kl.head_loss` writes the gradient into those logits, which live until the backward of the output layer
(autograd keeps its input `h` and needs the gradient of the logits). Liger-Kernel's fused linear
cross-entropy removes that by forming the gradients in the forward, chunk by chunk over tokens: for a chunk
of rows, logits z = h W^T, the per-row loss and dL/dz (here `kl._head_chunk`: CE + TopN KL to the detached
teacher, vocabulary-parallel: per-token scalars are all-reduced, the vocabulary is never gathered), then
dL/dh = g W and dL/dW += g^T h; the chunk's logits are dropped. What is kept for backward is dL/dh
[tokens, h] and dL/dW [V/tp, h] (0.5 GiB bf16 per head on the 2B preset) instead of [tokens, V/tp] logits.
The FLOPs are the same three GEMMs as the unfused path (no recomputation). Liger itself cannot be used: its
kernel is a plain full-vocabulary CE (no TopN KL, no teacher, no vocabulary sharding) and it is not on the GPU
machine.

The gradients are formed in the forward, so the per-token weights of the loss must be known then: the hook's
weighting (loss mask x mtp_loss_scaling_factor / num_heads / tokens, megatron's convention) is passed in as
`weights`, and the function returns the weighted sum as the scalar that rides on megatron's
MTPLossAutoScaler (whose backward multiplies by the schedule's loss scale: the gradient is exactly the
unfused one's, which scales the per-token loss by the same weights).

Tensor parallelism: the hidden states enter the output layer the way megatron's ColumnParallelLinear takes
them (all-gather of the sequence under sequence parallelism, else an identity whose backward all-reduces
dL/dh over TP), so every TP rank computes its vocabulary shard's logits and dL/dh is summed over ranks.

Shared teacher (`SharedMainLogits`). The hook's teacher is output_layer(h0) under no_grad, and megatron
computes the same product again for the main loss right after the hook returns (gpt_model.py:762). With
share_teacher_logits the hook computes the main logits once, with their graph, uses a detached alias as the
teacher, and hands them to the output layer's next call on the same hidden states (a one-shot wrapper of
that module's forward), so the main loss reuses them. The MTP losses then ride on the main logits instead of
the hidden states (the logits are what megatron's loss consumes, so their backward still passes through
every MTPLossAutoScaler).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor

from mtpd_megatron.mtpd.collectives import tp_size
from mtpd_megatron.mtpd.kl import HeadOutputs, TeacherStats, _compute_dtype, _head_chunk, default_chunk_tokens


class _FusedHeadLinear(torch.autograd.Function):
    """sum_i w_i * (alpha CE_i + beta T^2 D_i) of logits h W^T that are never stored whole."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        row_weights,
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
    ):
        st = TeacherStats(*stats_tensors)
        n = hidden.shape[0]
        full = spec.full_vocab(vocab_size)
        chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.is_cuda)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce = torch.empty(n, dtype=_compute_dtype(hidden), device=hidden.device)
        kl = torch.empty_like(ce)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = (
            torch.zeros(
                weight.shape,
                dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64,
                device=weight.device,
            )
            if want_w
            else None
        )
        want = want_h or want_w
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            h_c = hidden[lo:hi]
            z = h_c @ weight.t()  # this chunk's logits [rows, V/tp], in the output layer's dtype
            ce[lo:hi], kl[lo:hi], argmax[lo:hi] = _head_chunk(
                z,
                teacher[lo:hi],
                st[lo:hi],
                labels[lo:hi],
                vocab_start,
                alpha,
                beta,
                spec,
                full,
                group,
                z if want else None,
                None,
            )
            if not want:
                continue
            z.mul_(row_weights[lo:hi].unsqueeze(-1).to(z.dtype))  # z now holds w_i * dL_i/dz
            if want_h:
                grad_h[lo:hi] = z @ weight
            if want_w:
                grad_w += (z.t() @ h_c).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, kl, argmax)
        per_token = alpha * ce + (beta * spec.temperature**2) * kl
        total = (per_token * row_weights.to(per_token.dtype)).sum()
        return total, ce, kl, argmax

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_total
        dh = None if grad_h is None else grad_h.mul_(g.to(grad_h.dtype))
        dw = None if grad_w is None else grad_w.mul_(g.to(grad_w.dtype))
        return (dh, dw) + (None,) * 11


def _into_output_layer(hidden: Tensor, output_layer, tp_group) -> Tensor:
    """What megatron's ColumnParallelLinear does to its input before the GEMM (tensor_parallel/layers.py)."""
    if getattr(output_layer, "sequence_parallel", False):
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    if tp_size(tp_group) > 1:
        return copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    return hidden


def head_loss_from_hidden(
    hidden: Tensor,
    output_layer,
    output_weight: Optional[Tensor],
    *,
    rows: int,
    labels: Tensor,
    row_weights: Tensor,
    teacher: Tensor,
    stats: TeacherStats,
    alpha: float,
    beta: float,
    spec,
    vocab_size: int,
    vocab_start: int,
    group,
    chunk_tokens=None,
) -> tuple[Tensor, HeadOutputs]:
    """One head: (weighted loss sum, per-token outputs) from its hidden states [s_local, b, h].

    Rows are (position, batch) for positions t < `rows` (as the hook's slice logits[:rows]); `row_weights`
    [rows * b] is the hook's per-token weight (loss mask times scale / tokens). The returned HeadOutputs'
    `loss` is None (only the weighted sum is differentiable); ce, kl and student_argmax are per token."""
    weight = output_weight if output_weight is not None else output_layer.weight
    full = _into_output_layer(hidden, output_layer, group)  # [s, b, h]
    h = full[:rows].reshape(-1, full.shape[-1])
    total, ce, kl, argmax = _FusedHeadLinear.apply(
        h,
        weight,
        row_weights.detach(),
        teacher.detach(),
        tuple(stats),
        labels,
        vocab_start,
        float(alpha),
        float(beta),
        spec,
        vocab_size,
        group,
        chunk_tokens,
    )
    return total, HeadOutputs(loss=None, ce=ce, kl=kl, student_argmax=argmax)


class SharedMainLogits:
    """A one-shot replacement of the output layer's next forward on given hidden states (see module doc)."""

    def __init__(self, layer) -> None:
        self.original = layer.forward
        self.pending = None

    @classmethod
    def of(cls, layer) -> "SharedMainLogits":
        shared = layer.__dict__.get("_mtpd_shared_logits")
        if shared is None:
            shared = cls(layer)
            layer._mtpd_shared_logits = shared
            layer.forward = shared  # instance attribute: nn.Module.__call__ calls it instead of the class's
        return shared

    def put(self, hidden: Tensor, logits: Tensor) -> None:
        self.pending = (hidden.data_ptr(), tuple(hidden.shape), logits)

    def __call__(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        pending, self.pending = self.pending, None
        if (
            pending is not None
            and not runtime_gather_output
            and input_.data_ptr() == pending[0]
            and tuple(input_.shape) == pending[1]
        ):
            return pending[2], None
        return self.original(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)


def for_main_loss(carrier: Tensor) -> Tensor:
    """The shared logits as megatron's vocab-parallel CE gets them. That CE works in place on `logits.float()`:
    a new tensor for bf16/fp16 logits, but the logits themselves in fp32, where autograd forbids the in-place
    change of MTPLossAutoScaler's output (a view of its input); fp32 logits (CPU, tests) are cloned, bf16
    training keeps the one copy."""
    return carrier if carrier.dtype in (torch.bfloat16, torch.float16) else carrier.clone()


def main_logits(output_layer, hidden: Tensor, output_weight: Optional[Tensor]) -> Tensor:
    """The main head's logits with their graph, by the output layer's original forward."""
    shared = SharedMainLogits.of(output_layer)
    shared.pending = None
    out, _ = shared.original(hidden, weight=output_weight, runtime_gather_output=False)
    return out
