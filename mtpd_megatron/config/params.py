"""Parameter counts from the architecture formula, without building a model.

Why a formula: a preset's size has to be known on a login node (no GPU, no process group) and for models
that do not fit in memory here. tests/test_model.py checks every term against `sum(p.numel())` of a real
megatron-core model, so the formula cannot drift from what the builder makes.

The architecture is the one mtpd_megatron.model.builder makes: RMSNorm (weight only), SwiGLU MLPs, GQA
attention without biases, optional QK-norm (one RMSNorm of head_dim for queries and one for keys), RoPE
(no parameters), MoE layers with a router (experts x hidden, no bias; the expert bias is a buffer), routed
experts and an optional shared expert. Each MTP head is eh_proj (2h -> h) + enorm + hnorm + one
transformer layer of the last decoder layer's kind + its final norm; heads share the embedding and the
output layer with the main model.
"""

from __future__ import annotations

from mtpd_megatron.config.schema import Config


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: pad so that every TP shard gets an equal multiple of `divisible_by` (torch-free, so
    config checks and tools use it without importing megatron; model.builder re-exports it)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def moe_layer_pattern(cfg: Config) -> list[int]:
    """1 for an MoE decoder layer, 0 for a dense one (megatron's reading of moe_layer_freq)."""
    m, moe = cfg.model, cfg.model.moe
    if not moe.num_experts:
        return [0] * m.num_layers
    if isinstance(moe.layer_freq, list):
        return [int(x) for x in moe.layer_freq]
    return [1 if i % moe.layer_freq == 0 else 0 for i in range(m.num_layers)]


def _swiglu(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # fc1 is [2*ffn, hidden] (gate and up), fc2 is [hidden, ffn]


def _attention(cfg: Config) -> int:
    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv = m.hidden_size * (m.num_attention_heads + 2 * groups) * head_dim
    proj = m.num_attention_heads * head_dim * m.hidden_size
    qk_norm = 2 * head_dim if m.qk_layernorm else 0
    return m.hidden_size + qkv + proj + qk_norm  # + input_layernorm


def _layer(cfg: Config, is_moe: bool) -> tuple[int, int]:
    """(total, active per token) of one transformer layer."""
    m, moe = cfg.model, cfg.model.moe
    attn = _attention(cfg) + m.hidden_size  # + pre_mlp_layernorm
    if not is_moe:
        dense = _swiglu(m.hidden_size, m.ffn_hidden_size)
        return attn + dense, attn + dense
    expert = _swiglu(m.hidden_size, moe.ffn_hidden_size or m.ffn_hidden_size)
    shared = _swiglu(m.hidden_size, moe.shared_expert_hidden_size) if moe.shared_expert_hidden_size else 0
    router = moe.num_experts * m.hidden_size
    total = attn + router + shared + moe.num_experts * expert
    active = attn + router + shared + moe.router_topk * expert
    return total, active


def count_parameters(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes, for a tokenizer of `vocab_size` entries.

    The vocabulary is padded for the config's TP as the builder pads it. "active" counts what one token
    touches: every non-expert weight (embedding and output layer included) plus router_topk routed experts
    per MoE layer. Keys: padded_vocab_size, embedding, output_layer (0 when tied), decoder, mtp_head (one
    head), mtp_heads (all), main_model (embedding + decoder + output layer, no MTP heads), total (with the
    MTP heads), active (total's active part) and an `_active` twin of decoder, mtp_head(s) and main_model.
    """
    m = cfg.model
    vocab = padded_vocab(
        m.vocab_size or vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    )
    pattern = moe_layer_pattern(cfg)
    layers = [_layer(cfg, bool(is_moe)) for is_moe in pattern]
    final_norm = m.hidden_size
    decoder = sum(t for t, _ in layers) + final_norm
    decoder_active = sum(a for _, a in layers) + final_norm

    embedding = vocab * m.hidden_size
    output_layer = 0 if m.tie_embeddings else vocab * m.hidden_size
    # eh_proj [h, 2h] + enorm + hnorm + final_layernorm, then the last decoder layer's kind.
    head_extra = 2 * m.hidden_size * m.hidden_size + 3 * m.hidden_size
    last_total, last_active = layers[-1]
    mtp_head, mtp_head_active = head_extra + last_total, head_extra + last_active
    heads = cfg.mtp.num_heads

    main = embedding + decoder + output_layer
    main_active = embedding + decoder_active + output_layer
    return {
        "padded_vocab_size": vocab,
        "embedding": embedding,
        "output_layer": output_layer,
        "decoder": decoder,
        "decoder_active": decoder_active,
        "mtp_head": mtp_head,
        "mtp_head_active": mtp_head_active,
        "mtp_heads": heads * mtp_head,
        "mtp_heads_active": heads * mtp_head_active,
        "main_model": main,
        "main_model_active": main_active,
        "total": main + heads * mtp_head,
        "active": main_active + heads * mtp_head_active,
    }


def format_count(n: int) -> str:
    """1234567 -> '1.23M' (for the config checker's summary)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
