"""A torch-native RMSNorm/LayerNorm that works under sequence parallelism.

megatron-core's local spec builds norms through WrappedTorchNorm, which refuses sequence parallel
(transformer/torch_norm.py:50), and MoE at TP > 1 requires sequence parallel (moe_layer.py:629). So without
Transformer Engine or apex there is no spec that runs MoE at TP > 1 — on GPUs as well as CPUs.

A norm is position-wise, so sequence parallelism does not change its forward: each rank normalises its
own slice of the sequence. Its *weight gradient*, however, is then a partial sum over that slice and must
be all-reduced over the tensor-parallel group. megatron's finalize_model_grads does exactly that for
parameters tagged `sequence_parallel = True` (TE and apex norms set the same tag), so this module only has
to build the norm and tag its parameters.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelNorm:
    """Builds torch.nn.RMSNorm / LayerNorm with SP-tagged parameters. Signature of megatron's norm builders."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs Transformer Engine (not the torch norm)")
        kind = config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={kind!r}: only RMSNorm and LayerNorm have a torch-native norm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
