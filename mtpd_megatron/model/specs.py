"""Layer specs: Transformer Engine's when it imports, otherwise the torch-native fast path.

The torch-native path is megatron-core's local spec with two modules swapped through the spec system
(no subclassing of layers): `SequenceParallelNorm` for every norm and `SDPAttention` for core attention.
MoE layers' experts are swapped the same way for `GroupedGemmExperts` (grouped_experts.py) when
`model.moe.experts_backend` resolves to grouped (the default without TE).
`local` keeps megatron's reference modules untouched (used to check SDPA against megatron's attention).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_mtp_block_spec,
    get_gpt_mtp_block_spec_for_backend,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mtpd_megatron.model.grouped_experts import GroupedGemmExperts
from mtpd_megatron.model.norm import SequenceParallelNorm
from mtpd_megatron.model.sdpa_attention import SDPAttention

BACKENDS = ("auto", "sdpa", "te", "local")


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: str) -> str:
    if requested == "auto":
        return "te" if have_transformer_engine() else "sdpa"
    if requested == "te" and not have_transformer_engine():
        raise ValueError("model.attention_backend=te but transformer_engine is not installed (use sdpa or auto)")
    return requested


class TorchNativeSpecProvider(LocalSpecProvider):
    """megatron's LocalSpecProvider with an SP-capable norm and SDPA core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return SequenceParallelNorm

    def core_attention(self) -> type:
        return SDPAttention


def _torch_native_layer(spec: ModuleSpec, qk_layernorm: bool) -> ModuleSpec:
    """Swap norms and core attention in one TransformerLayer spec built by megatron's local spec."""
    sub = spec.submodules
    attn = sub.self_attention
    qk_norm = SequenceParallelNorm if qk_layernorm else IdentityOp
    attn_sub = dataclasses.replace(
        attn.submodules, core_attention=SDPAttention, q_layernorm=qk_norm, k_layernorm=qk_norm
    )
    new_sub = dataclasses.replace(
        sub,
        input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm,
        self_attention=dataclasses.replace(attn, submodules=attn_sub),
    )
    return dataclasses.replace(spec, submodules=new_sub)


def _with_grouped_experts(spec):
    """A TransformerLayer spec whose MoE experts (megatron's SequentialMLP) become GroupedGemmExperts.

    megatron 0.19 describes the MoE layer as `partial(MoELayer, submodules=MoESubmodules(experts=
    partial(SequentialMLP, submodules=...)))` (or a ModuleSpec); only the experts' class changes."""
    mlp = spec.submodules.mlp
    holder = mlp.keywords if isinstance(mlp, functools.partial) else None
    moe_sub = holder.get("submodules") if holder is not None else getattr(mlp, "submodules", None)
    experts = getattr(moe_sub, "experts", None)
    if experts is None:  # a dense layer
        return spec
    if isinstance(experts, functools.partial) and experts.func is SequentialMLP:
        experts = functools.partial(GroupedGemmExperts, *experts.args, **experts.keywords)
    elif isinstance(experts, ModuleSpec) and experts.module is SequentialMLP:
        experts = dataclasses.replace(experts, module=GroupedGemmExperts)
    else:  # TE's grouped experts or another implementation: left alone
        return spec
    moe_sub = dataclasses.replace(moe_sub, experts=experts)
    if holder is not None:
        mlp = functools.partial(mlp.func, *mlp.args, **dict(holder, submodules=moe_sub))
    else:
        mlp = dataclasses.replace(mlp, submodules=moe_sub)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))


def build_specs(config: TransformerConfig, backend: str, vp_stage=None, pp_rank=None, grouped_experts: bool = False):
    """Return (decoder block spec, MTP block spec or None) for the resolved backend; `grouped_experts`
    swaps MoE experts for GroupedGemmExperts (decoder and MTP heads alike)."""
    use_te = backend == "te"
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if backend == "sdpa":
        block = TransformerBlockSubmodules(
            layer_specs=[_torch_native_layer(s, config.qk_layernorm) for s in block.layer_specs],
            layer_norm=SequenceParallelNorm,
        )
    if grouped_experts and config.num_moe_experts:
        block = dataclasses.replace(block, layer_specs=[_with_grouped_experts(s) for s in block.layer_specs])
    if not config.mtp_num_layers:
        return block, None
    if backend == "sdpa":
        # The MTP inner layer takes the (already swapped) last decoder layer's spec.
        mtp = get_gpt_mtp_block_spec_for_backend(
            config, block, backend=TorchNativeSpecProvider(), vp_stage=vp_stage, pp_rank=pp_rank
        )
    else:
        mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=use_te, vp_stage=vp_stage, pp_rank=pp_rank)
    return block, mtp
