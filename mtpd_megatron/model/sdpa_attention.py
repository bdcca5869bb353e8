"""Core attention through torch.nn.functional.scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] score matrix in fp32 and runs
an unfused softmax (transformer/dot_product_attention.py); on the GPU machine that is 2.7-4.1x slower and
uses 3-6x the memory of SDPA's flash/memory-efficient kernels (shared/research/gpu-machine.md). This module
keeps megatron's interface ([s, b, heads, dim] in, [s, b, heads*dim] out) and its head bookkeeping (it
subclasses DotProductAttention for the per-partition sizes, softmax scale and dropout) but computes the
attention with SDPA: causal, GQA without repeating keys and values.

Context parallelism (CP > 1; megatron's own DotProductAttention refuses it, TE's attention is not available
without Transformer Engine): the local queries are this rank's two chunks of the load-balanced layout
(parallel/context.py). Keys and values are all-gathered over the CP group with megatron's
`gather_from_sequence_parallel_region` (its backward is the reduce-scatter of their gradients), put in
global order, and each local query chunk g attends causally to the global prefix of chunks 0..g (a
lower-right causal mask: SDPA's flash kernel on CUDA). Exact, and the same schedule as TE's
`cp_comm_type="all_gather"`; why not a ring: docs/design.md, "Context parallelism".
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from mtpd_megatron.parallel.context import chunk_order


class SDPAttention(DotProductAttention):
    """Drop-in `core_attention` for megatron's SelfAttention spec."""

    def __init__(self, config, *args, pg_collection=None, **kwargs):
        # dot_product_attention.py:57 asserts context_parallel_size == 1 for megatron's own attention; this
        # class computes attention under CP itself (forward), so its parent sees a CP-free copy of the config.
        cp = config.context_parallel_size
        parent_config = config
        if cp > 1:
            parent_config = copy.copy(config)
            parent_config.context_parallel_size = 1
        super().__init__(parent_config, *args, pg_collection=pg_collection, **kwargs)
        self.config = config
        self.cp_group = None
        if cp > 1:
            self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if self.cp_group is None:
                self.cp_group = parallel_state.get_context_parallel_group()

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
        if self.cp_group is not None:
            if not causal:
                raise ValueError("context parallelism with SDPA core attention supports causal masks only")
            return self._context_parallel(query, key, value, groups)
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

    def _context_parallel(self, query: Tensor, key: Tensor, value: Tensor, groups: int) -> Tensor:
        """Causal attention of this CP rank's two query chunks over the all-gathered keys and values."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        s_local, b = query.shape[0], query.shape[1]
        c = s_local // 2

        def global_order(x: Tensor) -> Tensor:
            # [cp * 2c, ...] in rank order (rank j: chunks j, 2cp-1-j) -> [2cp * c, ...] in sequence order
            gathered = gather_from_sequence_parallel_region(x, True, self.cp_group).view(cp, 2, c, *x.shape[1:])
            return torch.cat(
                [gathered[:, 0].reshape(cp * c, *x.shape[1:]), gathered[:, 1].flip(0).reshape(cp * c, *x.shape[1:])]
            )

        k_all, v_all = global_order(key), global_order(value)
        outputs = []
        for half, g in enumerate(chunk_order(cp, rank)):
            q = query[half * c : (half + 1) * c].permute(1, 2, 0, 3)  # [b, h, c, d]
            keys = (g + 1) * c  # chunk g sees the global prefix of chunks 0..g
            k, v = (t[:keys].permute(1, 2, 0, 3) for t in (k_all, v_all))
            outputs.append(
                F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=causal_lower_right(c, keys),
                    dropout_p=self.attention_dropout.p if self.training else 0.0,
                    scale=self.softmax_scale,
                    enable_gqa=groups > 1,
                )
            )
        context = torch.cat(outputs, dim=2)  # [b, h, s_local, d]
        return context.permute(2, 0, 1, 3).reshape(s_local, b, self.hidden_size_per_partition)
