"""MoE experts on torch's grouped GEMM, for machines without Transformer Engine.

Without TE, megatron-core 0.19.2's training experts are `SequentialMLP`: one small fc1/fc2 GEMM pair per
local expert, launched in a Python loop (128 experts x 2 GEMMs x layers per step: the moe_a1b preset ran
at MFU 4-5%, docs/benchmarks.md). megatron calls torch's `grouped_mm` only in its inference MoE path
(megatron/core/inference/moe/fused_moe.py). `GroupedGemmExperts` is `SequentialMLP` with only `forward`
replaced: the local experts' fc1 weights are stacked into one [E, 2F, H] tensor and the routed tokens (already
permuted by megatron's dispatcher, grouped by expert) go through one grouped GEMM for fc1 and one for fc2.

Layout: the experts' weights are two stacked parameters per layer, `weight1` [E, 2F, H] and `weight2`
[E, H, F] (E local experts), not SequentialMLP's 2E small ones. Each parameter costs the trainer a fixed
amount of per-parameter work (DDP's grad hook and its `main_grad.add_` per micro-batch, the optimizer's
main-to-model copy, its grad-norm term, a torch.stack per forward): with 128 experts that was ~14,000
launches in a 6-layer MoE step whose GPU work takes 240 ms of a 547 ms step (host-bound, docs/benchmarks.md).
Checkpoints stay SequentialMLP's: `sharded_state_dict` writes each stacked weight as the slab of the same
global tensor (`...experts.linear_fc1.weight`, [layers, experts, 2F, H]) that SequentialMLP writes expert by
expert, so torch_dist reshards between the two modules in both directions (optimizer moments included, which
megatron keys by the same sharded tensors), and `state_dict()` / `load_state_dict()` speak SequentialMLP's
per-expert names (`local_experts.<i>.linear_fc1.weight`, views of the stacked weights) for the converters.
The `local_experts` modules remain (megatron's construction and init draw the weights; `reference_forward`
runs megatron's own loop on views of the stacked weights) but own no parameters.

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

import contextlib
import re

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
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


_PER_EXPERT = re.compile(r"local_experts\.(\d+)\.linear_fc([12])\.weight$")
STACKED = (("weight1", "linear_fc1"), ("weight2", "linear_fc2"))  # (stacked parameter, each expert's linear)


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP's experts (same init, same checkpoints) as two stacked weights run by grouped GEMMs."""

    force_loop = False  # tests: run the per-expert loop even where grouped_mm would be used

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stacked = self._supported()
        if not self.stacked:
            return
        for stacked_name, name in STACKED:
            linears = [getattr(e, name) for e in self.local_experts]
            first = linears[0].weight
            with torch.no_grad():
                weight = torch.nn.Parameter(torch.stack([lin.weight for lin in linears]), first.requires_grad)
            for attr, value in vars(first).items():  # megatron's marks: allreduce (expert), tensor_model_parallel...
                setattr(weight, attr, value)
            self.register_parameter(stacked_name, weight)
            for lin in linears:
                del lin._parameters["weight"]
                lin.weight = None  # a plain attribute: views are set only while megatron's own code reads them
        self._register_state_dict_hook(_per_expert_state_dict)
        self._register_load_state_dict_pre_hook(_stack_per_expert_state_dict, with_module=True)

    def _supported(self) -> bool:
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
        if not self.stacked:
            return super().forward(x, tokens_per_expert, permuted_probs)
        use_gmm = grouped_mm_available(x.device, x.dtype) and not self.force_loop
        offsets = counts = None
        if use_gmm:  # no host sync: the kernel reads the group ends on the device
            offsets = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), dim=0, dtype=torch.int32)
        else:
            counts = tokens_per_expert.tolist()
        h = grouped_linear(x, self.weight1, counts, offsets, use_gmm)
        if self.config.bias_activation_fusion:  # model.compile_layers: megatron's fused weighted SwiGLU, as MLP
            h = weighted_bias_swiglu_impl(
                h, None, permuted_probs.unsqueeze(-1), self.config.activation_func_fp8_input_store
            )
        else:
            x_glu, x_linear = torch.chunk(h, 2, dim=-1)
            h = self.config.activation_func(x_glu) * x_linear
            h = (h * permuted_probs.unsqueeze(-1)).to(h.dtype)  # as MLP.forward: scale in the activation's dtype
        return grouped_linear(h, self.weight2, counts, offsets, use_gmm), None

    @contextlib.contextmanager
    def _expert_views(self, as_parameters: bool):
        """Each local expert's linear_fc1/fc2 `weight` as a view of the stacked weights while megatron's own
        code reads them: autograd views (gradients reach the stacked weights) or, for megatron's
        sharded_state_dict (which collects registered parameters), parameters sharing their storage."""
        if not self.stacked:
            yield
            return
        for i, expert in enumerate(self.local_experts):
            for stacked_name, name in STACKED:
                view = getattr(self, stacked_name)[i]
                lin = getattr(expert, name)
                if as_parameters:
                    lin.__dict__.pop("weight", None)
                    lin.register_parameter("weight", torch.nn.Parameter(view.detach(), requires_grad=False))
                else:
                    lin.weight = view
        try:
            yield
        finally:
            for expert in self.local_experts:
                for lin in (expert.linear_fc1, expert.linear_fc2):
                    lin._parameters.pop("weight", None)
                    lin.weight = None

    def reference_forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """megatron's SequentialMLP forward on the same weights (the bench's GPU numerics check)."""
        with self._expert_views(as_parameters=False):
            return SequentialMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's checkpoint tensors, each stacked weight written as one slab of them (module docstring).

        Keys, replica ids and the global shape come from megatron's own per-expert entries; only where
        `singleton_local_shards` stores every expert under its own key do those per-expert entries stay
        (views of the stacked weights: model-only reads, such as a converter's)."""
        with self._expert_views(as_parameters=True):
            per_expert = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.stacked or (metadata or {}).get("singleton_local_shards", False):
            return per_expert
        out = {k: v for k, v in per_expert.items() if not _PER_EXPERT.search(k)}
        reference = per_expert[f"{prefix}local_experts.0.linear_fc2.weight"]  # a plain ShardedTensor
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        axis = len(sharded_offsets)
        for stacked_name, name in STACKED:
            out[f"{prefix}{stacked_name}"] = ShardedTensor.from_rank_offsets(
                reference.key[: -len("linear_fc2.weight")] + f"{name}.weight",
                getattr(self, stacked_name),
                *sharded_offsets,
                (axis, ep_rank, ep_size),
                replica_id=reference.replica_id,
                prepend_axis_num=axis,
            )
        return out


def _per_expert_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict hook: the stacked weights under SequentialMLP's per-expert names (views, no copies)."""
    for stacked_name, name in STACKED:
        stacked = state_dict.pop(f"{prefix}{stacked_name}", None)
        if stacked is None:
            continue
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}local_experts.{i}.{name}.weight"] = stacked[i]


def _stack_per_expert_state_dict(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: SequentialMLP's per-expert entries stacked into weight1/weight2."""
    for stacked_name, name in STACKED:
        keys = [f"{prefix}local_experts.{i}.{name}.weight" for i in range(module.num_local_experts)]
        if f"{prefix}{stacked_name}" in state_dict or not all(k in state_dict for k in keys):
            continue  # stacked already, or absent: load_state_dict reports what is missing
        state_dict[f"{prefix}{stacked_name}"] = torch.stack([state_dict.pop(k) for k in keys])


def resolve_experts_backend(requested: str, attention_backend: str) -> str:
    """auto: grouped on the torch-native path (TE absent); with TE, megatron's own experts stay."""
    if requested not in EXPERT_BACKENDS:
        raise ValueError(f"model.moe.experts_backend={requested!r}: must be one of {', '.join(EXPERT_BACKENDS)}")
    if requested == "auto":
        return "grouped" if attention_backend == "sdpa" else "sequential"
    return requested
