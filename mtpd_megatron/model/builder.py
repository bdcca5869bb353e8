"""Build a megatron-core GPTModel with cascaded MTP heads from our typed Config.

GPTModel rather than HybridModel: megatron-core 0.19 marks GPTModel deprecated in favour of HybridModel,
but for a pure-attention model the GPT path is the one with the TE/local layer specs, the MTP block spec
helpers (`get_gpt_mtp_block_spec`) and the checkpoint key layout that Megatron-LM's tools and Bridge know.
Both models call the same `process_mtp_loss`, which is where MTP-D hooks in, so a later switch is cheap.
See docs/design.md.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from mtpd_megatron.config.params import padded_vocab as padded_vocab_size  # noqa: F401 (re-exported: one rule)
from mtpd_megatron.config.schema import Config
from mtpd_megatron.model.grouped_experts import resolve_experts_backend
from mtpd_megatron.model.specs import build_specs, resolve_backend


def transformer_config(
    cfg: Config, *, params_dtype: torch.dtype = torch.float32, use_cpu_init: Optional[bool] = None
) -> TransformerConfig:
    """Translate our Config into megatron-core's TransformerConfig. `use_cpu_init` None: CPU initialisation
    (full matrices drawn on the host, identical weights whatever the TP layout) unless
    `model.init_on_device` and a GPU is visible (megatron's default: each rank draws its shards on the GPU)."""
    if use_cpu_init is None:
        use_cpu_init = not (cfg.model.init_on_device and torch.cuda.is_available())
    m, p, moe = cfg.model, cfg.parallel, cfg.model.moe
    bf16 = params_dtype == torch.bfloat16
    if m.compile_layers:
        enable_rope_fusion()  # before TransformerConfig: its __post_init__ checks that a fused RoPE exists
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        bias_activation_fusion=m.compile_layers,  # megatron's torch.compile'd SwiGLU (fused_bias_swiglu.py)
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=m.compile_layers,  # TE's kernel, else a compiled torch RoPE (enable_rope_fusion)
        # megatron's own fused CE (fusions/fused_cross_entropy.py, jit_fuser = torch.compile): its backward
        # returns bf16 gradients (line 82), which is exact only for bf16 logits, so bf16 runs only
        cross_entropy_loss_fusion=m.compile_layers and bf16,
        cross_entropy_fusion_impl="native",
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype if bf16 else None,
        use_cpu_initialization=use_cpu_init,
        mtp_num_layers=cfg.mtp.num_heads or None,
        mtp_loss_scaling_factor=cfg.mtp.loss_scaling_factor,
        mtp_detach_heads=bool(cfg.mtp.num_heads and cfg.mtp.detach_heads),
    )
    if moe.num_experts:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.router_topk,
            moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_hidden_size,
            moe_layer_freq=moe.layer_freq,
            moe_router_score_function=moe.score_function,
            moe_router_load_balancing_type=moe.load_balancing_type,
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing_type != "none" else 0.0,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_token_dispatcher_type=moe.token_dispatcher,
            moe_grouped_gemm=False,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kwargs)


def build_model(
    cfg: Config,
    vocab_size: int,
    *,
    params_dtype: torch.dtype = torch.float32,
    pg_collection: Optional[ProcessGroupCollection] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """Build this rank's GPTModel (its pipeline stage) with MTP heads. `vocab_size` is the padded size."""
    from megatron.core import parallel_state

    tcfg = transformer_config(cfg, params_dtype=params_dtype)
    backend = resolve_backend(cfg.model.attention_backend)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    grouped = (
        bool(cfg.model.moe.num_experts) and resolve_experts_backend(cfg.model.moe.experts_backend, backend) == "grouped"
    )
    block_spec, mtp_spec = build_specs(tcfg, backend, vp_stage=vp_stage, grouped_experts=grouped)
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    previous = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)  # the deprecation warning is answered in docs/design.md
    try:
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec,
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            mtp_block_spec=mtp_spec if post_process else None,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
    finally:
        gpt_logger.setLevel(previous)
    if cfg.model.compile_layers:
        compile_norms(model)
    return model


def compile_norms(model: torch.nn.Module) -> int:
    """Route every torch RMSNorm's forward through one shared torch.compile'd `F.rms_norm` (a fused kernel
    per norm without TE); returns how many. One compiled function for all norms rather than
    `Module.compile()` per module: dynamo guards on the module instance, so 100+ norms would exceed its
    recompile limit and fall back to eager. Parameters, state_dict keys and the math are unchanged."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm) and not getattr(module, "_mtpd_compiled", False):
            module.forward = functools.partial(_compiled_rms_norm_forward, module)
            module._mtpd_compiled = True
            count += 1
    return count


def enable_rope_fusion() -> None:
    """Give megatron's RoPE fusion hook a kernel where TE is absent.

    With `apply_rope_fusion` megatron calls `rope_utils.fused_apply_rotary_pos_emb` (TE's fused RoPE, None
    without TE; models/common/embeddings/rope_utils.py:316, checked by transformer_config.py:2184). Without
    TE it is bound here to megatron's own unfused RoPE (`_apply_rotary_pos_emb_bshd`: chunk, cat, cos, sin,
    two products and a sum, each a kernel over q and k, forward and backward) under one torch.compile, so
    inductor fuses it into a kernel or two. Same math: megatron takes its unfused path for what TE's kernel
    does not cover (mscale != 1, MLA interleaving, mRoPE), and so does this binding. Process-wide; TE's
    kernel, where megatron bound it, is left alone."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _compiled_rope


@functools.cache
def _compiled_rope_bshd():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return torch.compile(_apply_rotary_pos_emb_bshd, dynamic=None)


def _compiled_rope(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False, interleaved=False):
    """TE's `fused_apply_rotary_pos_emb` signature (sbhd tensors) over the compiled megatron RoPE."""
    return _compiled_rope_bshd()(t, freqs, rotary_interleaved=interleaved)


@functools.cache
def _compiled_rms_norm():
    return torch.compile(torch.nn.functional.rms_norm, dynamic=None)


def _compiled_rms_norm_forward(module: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return _compiled_rms_norm()(x, module.normalized_shape, module.weight, module.eps)
