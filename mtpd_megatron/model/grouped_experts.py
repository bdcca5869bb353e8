"""MoE experts on torch's grouped GEMM, for machines without Transformer Engine.

Without TE, megatron-core 0.19.2's training experts are `SequentialMLP`: one small fc1/fc2 GEMM pair per
local expert, launched in a Python loop (128 experts x 2 GEMMs x layers per step: the moe_a1b preset ran
at MFU 4-5%, docs/benchmarks.md). megatron calls torch's `grouped_mm` only in its inference MoE path
(megatron/core/inference/moe/fused_moe.py). `GroupedGemmExperts` is `SequentialMLP` with only `forward`
replaced: the local experts' fc1 weights are stacked into one [E, 2F, H] tensor and the routed tokens (already
permuted by megatron's dispatcher, grouped by expert) go through one grouped GEMM for fc1 and one for fc2.

Why a subclass of SequentialMLP rather than TEGroupedMLP's layout: the parameters stay exactly where
SequentialMLP keeps them (`local_experts.<i>.linear_fc1.weight`, ...), so `state_dict`/`sharded_state_dict`
(inherited, unchanged) and every checkpoint, converter and HF export keep working, and a run can switch
between the two modules on resume. The price is a `torch.stack` of the expert weights per forward (a
bandwidth-bound copy of the layer's expert weights, small next to the GEMMs it saves).

Paths: on CUDA with bf16 activations, `torch.nn.functional.grouped_mm` (torch >= 2.10; `torch._grouped_mm`
before), the cuBLAS/CUTLASS grouped kernel on Hopper. Everywhere else (CPU, fp32) a loop of per-expert matmuls
on the same stacked weights: the numerics reference (torch 2.13's CPU grouped_mm has a forward but its
backward fails) and what the CPU tests exercise. The math is megatron's MLP exactly: fc1 -> SwiGLU
(`silu(x_glu) * x_linear`) -> times the router prob in the activation's dtype -> fc2, no biases; with
`bias_activation_fusion` (model.compile_layers) megatron's own fused `weighted_bias_swiglu_impl`, as MLP does.
Configurations this module does not cover (expert TP > 1, biases, non-gated activations, FP8/FP4, probs
applied on the input, clamped/offset GLU) fall back to SequentialMLP's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

try:  # torch >= 2.10
    from torch.nn.functional import grouped_mm as _grouped_mm
except ImportError:  # pragma: no cover - older torch
    _grouped_mm = getattr(torch, "_grouped_mm", None)

EXPERT_BACKENDS = ("auto", "grouped", "sequential")


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM is used for training on CUDA in bf16 only (see the module docstring)."""
    return _grouped_mm is not None and device.type == "cuda" and dtype == torch.bfloat16


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: list, offsets: torch.Tensor, use_grouped_mm: bool
) -> torch.Tensor:
    """Rows of `x` [T, in] grouped by expert (`tokens_per_expert`), each times its expert's `weight[e]`
    [out, in] transposed: [T, out]. `offsets` are the cumulative row ends (int32, on x's device)."""
    if use_grouped_mm:
        return _grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    pieces = torch.split(x, tokens_per_expert)
    return torch.cat([piece @ weight[e].t() for e, piece in enumerate(pieces)], dim=0)


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP (same parameters, same checkpoint keys) whose forward runs all local experts at once."""

    force_loop = False  # tests: run the per-expert loop even where grouped_mm would be used

    def _supported(self, hidden: torch.Tensor) -> bool:
        c = self.config
        first = self.local_experts[0]
        return (
            self.num_local_experts > 1
            and self.tp_group.size() == 1
            and c.gated_linear_unit
            and c.activation_func is F.silu
            and not c.add_bias_linear
            and not getattr(c, "use_te_activation_func", False)
            and not (c.fp8 or getattr(c, "fp4", None))
            and not c.moe_apply_probs_on_input
            and getattr(c, "activation_func_clamp_value", None) is None
            and not getattr(c, "glu_linear_offset", 0.0)
            and getattr(first.linear_fc1, "bias", None) is None
        )

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ):
        x = permuted_local_hidden_states
        if not self._supported(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        use_gmm = grouped_mm_available(x.device, x.dtype) and not self.force_loop
        offsets = counts = None
        if use_gmm:  # no host sync: the kernel reads the group ends on the device
            offsets = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), dim=0, dtype=torch.int32)
        else:
            counts = tokens_per_expert.tolist()
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, 2F, H]
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, H, F]
        h = grouped_linear(x, w1, counts, offsets, use_gmm)
        if self.config.bias_activation_fusion:  # model.compile_layers: megatron's fused weighted SwiGLU, as MLP
            h = weighted_bias_swiglu_impl(
                h, None, permuted_probs.unsqueeze(-1), self.config.activation_func_fp8_input_store
            )
        else:
            x_glu, x_linear = torch.chunk(h, 2, dim=-1)
            h = self.config.activation_func(x_glu) * x_linear
            h = (h * permuted_probs.unsqueeze(-1)).to(h.dtype)  # as MLP.forward: scale in the activation's dtype
        return grouped_linear(h, w2, counts, offsets, use_gmm), None

    def reference_forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """megatron's SequentialMLP forward on the same weights (the bench's GPU numerics check)."""
        return SequentialMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)


def resolve_experts_backend(requested: str, attention_backend: str) -> str:
    """auto: grouped on the torch-native path (TE absent); with TE, megatron's own experts stay."""
    if requested not in EXPERT_BACKENDS:
        raise ValueError(f"model.moe.experts_backend={requested!r}: must be one of {', '.join(EXPERT_BACKENDS)}")
    if requested == "auto":
        return "grouped" if attention_backend == "sdpa" else "sequential"
    return requested
