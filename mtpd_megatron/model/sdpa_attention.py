"""Core attention through torch.nn.functional.scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] score matrix in fp32 and runs
an unfused softmax (transformer/dot_product_attention.py); on the GPU machine that is 2.7-4.1x slower and
uses 3-6x the memory of SDPA's flash/memory-efficient kernels (shared/research/gpu-machine.md). This module
keeps megatron's interface ([s, b, heads, dim] in, [s, b, heads*dim] out) and its head bookkeeping (it
subclasses DotProductAttention for the per-partition sizes, softmax scale and dropout) but computes the
attention with SDPA: causal, GQA without repeating keys and values.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Drop-in `core_attention` for megatron's SelfAttention spec."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences need Transformer Engine attention (attention_backend=te)")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPA core attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron masks are True where attention is NOT allowed
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=causal and q.shape[2] > 1,
            scale=self.softmax_scale,
            enable_gqa=groups > 1,
        )
        # [b, h, s, d] -> [s, b, h*d]
        s, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
