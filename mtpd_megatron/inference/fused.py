"""Decoding-only fused forms of two small pieces of the model, derived from megatron's modules (no fork).

* `FusedHeadPrologue`: an MTP layer's enorm(embedding), hnorm(hidden), concat, eh_proj is, per row,
      W_e (g_e * e / rms(e)) + W_h (g_h * h / rms(h))  =  [W_e diag(g_e), W_h diag(g_h)] @ [e / rms(e), h / rms(h)]
  so it becomes one normalisation without affine over the concatenated [e, h] viewed as two halves (one
  kernel) and one GEMM over pre-concatenated weights with the gains (and LayerNorm biases) folded in. The
  folded weight is a derived copy; `refresh()` recomputes it in place from the megatron parameters (the
  decoder calls it at every `generate`, so CUDA graphs keep pointing at the same storage). Folding rounds
  differently from megatron's two-step form, so drafts may differ in the last bit; the output tokens never
  depend on drafts (only acceptance does).
* `chunked_greedy`: the greedy token (and optionally the top-1 probability) of `hidden @ W.T` over the first
  `limit` vocabulary rows, in chunks, with a running (max, index, log-sum-exp): the [positions, V] logits are
  never materialised. Ties go to the lowest index, as torch.argmax.

Why written here: megatron-core has no decode-time fusion of the MTP prologue (its inference path calls the
same modules), and Liger-Kernel's fused linear ops are for losses, not argmax; see docs/design-inference.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _norm_kind(norm) -> tuple:
    """(kind, eps, weight, bias) of a megatron norm module (torch RMSNorm / LayerNorm or a wrapper of them)."""
    name = type(norm).__name__.lower()
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    if isinstance(eps, (tuple, list)):
        eps = eps[0]
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if weight is None or eps is None:
        raise ValueError(f"fused_prologue: cannot read the gain/eps of {type(norm).__name__}")
    if getattr(norm, "zero_centered_gamma", False) or getattr(
        getattr(norm, "config", None), "layernorm_zero_centered_gamma", False
    ):
        raise ValueError("fused_prologue does not support layernorm_zero_centered_gamma")
    kind = "rms" if "rms" in name else "layer"
    return kind, float(eps), weight, bias


class FusedHeadPrologue:
    """enorm + hnorm + concat + eh_proj of one megatron MultiTokenPredictionLayer as norm + one GEMM."""

    def __init__(self, layer):
        if getattr(layer, "mtp_layer_pattern", None) is not None:
            raise ValueError("fused_prologue supports GPT MTP layers (one TransformerLayer per head) only")
        self.layer = layer
        ke, self.eps, _, _ = _norm_kind(layer.enorm)
        kh, eps_h, _, _ = _norm_kind(layer.hnorm)
        if ke != kh or eps_h != self.eps:
            raise ValueError("fused_prologue needs enorm and hnorm of the same kind and eps")
        self.kind = ke
        w = layer.eh_proj.weight
        if w.shape[1] != 2 * w.shape[0] and w.shape[1] % 2:
            raise ValueError("fused_prologue needs eh_proj of shape [h, 2h] (TP=1)")
        self.weight = torch.empty_like(w)
        has_bias = getattr(layer.eh_proj, "bias", None) is not None or getattr(layer.enorm, "bias", None) is not None
        self.bias = torch.empty(w.shape[0], dtype=w.dtype, device=w.device) if has_bias else None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        layer = self.layer
        w = layer.eh_proj.weight.float()
        h = w.shape[1] // 2
        _, _, ge, be = _norm_kind(layer.enorm)
        _, _, gh, bh = _norm_kind(layer.hnorm)
        folded = torch.cat([w[:, :h] * ge.float(), w[:, h:] * gh.float()], dim=1)
        self.weight.copy_(folded.to(self.weight.dtype))
        if self.bias is not None:
            bias = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            if getattr(layer.eh_proj, "bias", None) is not None:
                bias += layer.eh_proj.bias.float()
            if be is not None:
                bias += w[:, :h] @ be.float()
            if bh is not None:
                bias += w[:, h:] @ bh.float()
            self.bias.copy_(bias.to(self.bias.dtype))

    def __call__(self, hidden: Tensor, embedded: Tensor) -> Tensor:
        """hidden, embedded [s, b, h] -> eh_proj output [s, b, h] (megatron's order: embedding first)."""
        s, b, h = hidden.shape
        x = torch.cat((embedded, hidden), dim=-1).view(s, b, 2, h)
        if self.kind == "rms":
            x = F.rms_norm(x, (h,), eps=self.eps)
        else:
            x = F.layer_norm(x, (h,), eps=self.eps)
        return F.linear(x.view(s, b, 2 * h), self.weight, self.bias)


def chunked_greedy(
    hidden: Tensor, weight: Tensor, limit: int, chunk: int, *, scale=None, fp32: bool = False, confidence: bool = False
) -> tuple:
    """hidden [s, b, h], weight [V, h] -> (tokens [s, b], top-1 probability [s, b] fp32 or None).

    `scale` is applied to each chunk's logits (megatron's `_scale_logits`); `fp32` computes each chunk's logits
    in fp32 (fp32 output of a bf16 GEMM where torch supports it).
    """
    s, b, h = hidden.shape
    flat = hidden.reshape(s * b, h)
    best = torch.full((s * b,), float("-inf"), dtype=torch.float32, device=hidden.device)
    index = torch.zeros(s * b, dtype=torch.long, device=hidden.device)
    lse = torch.full_like(best, float("-inf")) if confidence else None
    for lo in range(0, limit, chunk):
        w = weight[lo : min(lo + chunk, limit)]
        logits = matmul_logits(flat, w, fp32)
        if scale is not None:
            logits = scale(logits)
        values, local = logits.max(dim=-1)
        values = values.float()
        better = values > best  # strict: an equal later maximum keeps the earlier (lower) index
        best = torch.where(better, values, best)
        index = torch.where(better, local + lo, index)
        if confidence:
            lse = torch.logaddexp(lse, torch.logsumexp(logits.float(), dim=-1))
    prob = torch.exp(best - lse).view(s, b) if confidence else None
    return index.view(s, b), prob


def matmul_logits(x: Tensor, w: Tensor, fp32: bool) -> Tensor:
    """x [n, h] @ w[V, h]^T; with `fp32`, fp32 logits from a bf16 GEMM with fp32 output (where torch has it)."""
    if not fp32 or x.dtype == torch.float32:
        return F.linear(x, w)
    try:
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return F.linear(x.float(), w.float())


def top1_probability(logits: Tensor, values: Optional[Tensor] = None) -> Tensor:
    """softmax(logits).max(-1) computed as exp(max - logsumexp) in fp32."""
    logits = logits.float()
    if values is None:
        values = logits.max(dim=-1).values
    return torch.exp(values.float() - torch.logsumexp(logits, dim=-1))
