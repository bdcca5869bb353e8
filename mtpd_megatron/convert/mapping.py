"""Which stock transformers class expresses a model exactly, and how each tensor maps between the two.

The megatron side is our GPTModel at TP=EP=PP=1 (live parameter names, as `model.state_dict()` shows
them). The HF side is the layout `save_pretrained` of transformers 5.24 writes for the chosen class
(per-expert tensors, as on the Hub). Every choice below is exact in fp32, not an approximation:

* Dense, QK-norm      -> Qwen3ForCausalLM   (RMSNorm, SwiGLU, GQA, per-head q/k RMSNorm, RoPE, no biases)
* Dense, no QK-norm   -> LlamaForCausalLM   (same without QK-norm; Qwen2 would force q/k/v biases)
* MoE, sigmoid router -> Glm4MoeForCausalLM (sigmoid + `e_score_correction_bias` = megatron's expert_bias,
  ungated shared expert of n x the expert size, first-k-dense layers, optional QK-norm,
  partial_rotary_factor forced to 1.0)
* MoE, softmax router, no shared expert, QK-norm    -> Qwen3MoeForCausalLM (any dense/MoE layer pattern
  through `mlp_only_layers`)
* MoE, softmax router, no shared expert, no QK-norm, every layer MoE -> MixtralForCausalLM

Refused (one-line ConvertError): softmax router with a shared expert (Qwen2-MoE gates its shared expert with
a sigmoid, megatron's is ungated), a shared expert that is not a multiple of the routed expert size (GLM
sizes it as n x moe_intermediate_size), sigmoid MoE whose dense layers are not the first k, expert bias with
a softmax router.

Routing equivalences (megatron moe_utils.topk_routing_with_score_function, 0.19.2):
  softmax, pre_softmax off: softmax over the top-k logits == softmax over all, top-k, renormalised
  (HF norm_topk_prob=True). sigmoid: top-k of sigmoid+bias, weights = sigmoid at those experts, divided by
  their sum (+1e-20) when k > 1 -> GLM's norm_topk_prob = (k > 1), routed_scaling_factor 1.0.

Tensor transforms:
* `linear_qkv.weight` is interleaved per query group: rows are [ng, (np/ng + 2), hn] -> for group g its
  np/ng query heads, then its key head, then its value head (attention.py get_query_key_value_tensors).
  HF q_proj rows are heads in order (head j uses kv head j // (np/ng)), k_proj/v_proj the kv heads.
* `linear_fc1.weight` of SwiGLU is [gate; up] stacked on rows (mlp.py glu: chunk(2), silu(first) * second).
* Embedding and output layer keep megatron's padded vocabulary (HF vocab_size = padded rows), so logits
  are equal entry by entry and a round trip is bitwise.

MTP heads use the DeepSeek-V3 layout after the decoder layers: `model.layers.{L+k}.` holds enorm, hnorm,
eh_proj (input cat(enorm(embedding), hnorm(hidden)), embedding first), the inner layer's usual
self_attn/mlp/norm names, and shared_head.norm (megatron's final_layernorm). shared_head.head and
embed_tokens are not duplicated: megatron shares the LM head and the embedding with the main model.
The inner layer has the structure of the last decoder layer (megatron builds it from that spec). These names
are the same wherever an export keeps the heads (its main files or the `mtp/` sidecar: convert/mtp_heads.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from mtpd_megatron.config.schema import Config
from mtpd_megatron.convert import ConvertError

# ---------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFArch:
    """One transformers class and the names its checkpoints use."""

    name: str  # our key, also the HF model_type
    architecture: str  # config.json "architectures"
    config_class: str  # transformers config class
    moe: bool
    moe_block: str = "mlp"  # module holding router and experts in the checkpoint
    expert_proj: tuple = ("gate_proj", "up_proj", "down_proj")
    router_fp32: bool = False  # the class keeps the router in fp32 (_keep_in_fp32_modules_strict)
    expert_bias: bool = False  # has gate.e_score_correction_bias
    shared_expert: bool = False  # has ungated mlp.shared_experts


ARCHS = {
    "qwen3": HFArch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", moe=False),
    "llama": HFArch("llama", "LlamaForCausalLM", "LlamaConfig", moe=False),
    "glm4_moe": HFArch(
        "glm4_moe",
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        moe=True,
        router_fp32=True,
        expert_bias=True,
        shared_expert=True,
    ),
    "qwen3_moe": HFArch("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", moe=True),
    "mixtral": HFArch(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        moe=True,
        moe_block="block_sparse_moe",
        expert_proj=("w1", "w3", "w2"),
    ),
}


@dataclass(frozen=True)
class Dims:
    """The shapes every transform needs, resolved from a Config (None fields filled with megatron's rule)."""

    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    experts: int
    topk: int
    moe_ffn: int
    shared_ffn: int  # 0 = no shared expert
    pattern: tuple  # 1 = MoE layer, per decoder layer
    qk_norm: bool
    tied: bool
    mtp: int

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def mtp_layer_moe(self) -> bool:
        """The MTP inner layer is built from the last decoder layer's spec."""
        return bool(self.pattern) and bool(self.pattern[-1])


def moe_pattern(cfg: Config) -> tuple:
    """megatron's moe_layer_freq semantics (gpt_layer_specs.py): int k -> layer i is MoE iff i % k == 0."""
    m = cfg.model
    if not m.moe.num_experts:
        return tuple(0 for _ in range(m.num_layers))
    freq = m.moe.layer_freq
    if isinstance(freq, int):
        return tuple(1 if i % freq == 0 else 0 for i in range(m.num_layers))
    if len(freq) != m.num_layers:
        raise ConvertError(f"model.moe.layer_freq has {len(freq)} entries for {m.num_layers} layers")
    return tuple(int(bool(x)) for x in freq)


def dims(cfg: Config) -> Dims:
    m = cfg.model
    heads = m.num_attention_heads
    moe = m.moe
    return Dims(
        num_layers=m.num_layers,
        hidden=m.hidden_size,
        heads=heads,
        groups=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        ffn=m.ffn_hidden_size,
        experts=moe.num_experts,
        topk=moe.router_topk if moe.num_experts else 0,
        moe_ffn=(moe.ffn_hidden_size or m.ffn_hidden_size) if moe.num_experts else 0,
        shared_ffn=(moe.shared_expert_hidden_size or 0) if moe.num_experts else 0,
        pattern=moe_pattern(cfg),
        qk_norm=m.qk_layernorm,
        tied=m.tie_embeddings,
        mtp=cfg.mtp.num_heads,
    )


def choose_arch(cfg: Config) -> HFArch:
    """The stock class that expresses `cfg` exactly, or a one-line ConvertError saying why none does."""
    d = dims(cfg)
    moe = cfg.model.moe
    if float(cfg.model.rotary_base) != float(int(cfg.model.rotary_base)):
        # builder.py passes int(rotary_base) to megatron; HF would use the fractional value
        raise ConvertError(f"model.rotary_base={cfg.model.rotary_base} is not an integer (megatron truncates it)")
    if not d.experts:
        return ARCHS["qwen3"] if d.qk_norm else ARCHS["llama"]
    if sum(d.pattern) == 0:
        raise ConvertError("model.moe.layer_freq makes no layer MoE; set model.moe.num_experts=0 for a dense model")
    if moe.score_function == "sigmoid":
        first_dense = d.pattern.index(1)
        if any(x == 0 for x in d.pattern[first_dense:]):
            raise ConvertError(
                f"model.moe.layer_freq={list(d.pattern)}: Glm4Moe (the sigmoid-router class) only has the first k "
                "layers dense; no transformers class expresses this pattern"
            )
        if d.shared_ffn and d.shared_ffn % d.moe_ffn:
            raise ConvertError(
                f"model.moe.shared_expert_hidden_size={d.shared_ffn} is not a multiple of the expert size "
                f"{d.moe_ffn} (Glm4Moe sizes the shared expert as n_shared_experts x moe_intermediate_size)"
            )
        if d.experts < 2:
            raise ConvertError("model.moe.num_experts must be >= 2 for Glm4Moe's router")
        return ARCHS["glm4_moe"]
    if moe.score_function != "softmax":
        raise ConvertError(
            f"model.moe.score_function={moe.score_function!r}: only softmax and sigmoid map to transformers"
        )
    if moe.expert_bias:
        raise ConvertError("model.moe.expert_bias with a softmax router has no transformers class (use sigmoid)")
    if d.shared_ffn:
        raise ConvertError(
            "softmax router + shared expert: Qwen2-MoE gates its shared expert with a sigmoid, megatron's is "
            "ungated, so no transformers class is exact (use score_function sigmoid -> Glm4Moe)"
        )
    if d.qk_norm:
        return ARCHS["qwen3_moe"]
    if all(d.pattern):
        return ARCHS["mixtral"]
    raise ConvertError(
        "softmax MoE without QK-norm and with dense layers: Mixtral has no dense layers and Qwen3-MoE always "
        "has QK-norm; set model.qk_layernorm=true or make every layer MoE"
    )


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------


def hf_config_kwargs(
    cfg: Config, arch: HFArch, vocab_rows: int, *, dtype: torch.dtype, special_ids: Optional[dict] = None
) -> dict:
    """Keyword arguments for the transformers config class of `arch` (the main model; the MTP fields depend on
    where the export puts the heads: convert/mtp_heads.py `config_fields`)."""
    d = dims(cfg)
    m = cfg.model
    theta = float(int(m.rotary_base))
    kw = dict(
        vocab_size=vocab_rows,
        hidden_size=d.hidden,
        intermediate_size=d.ffn,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.groups,
        head_dim=d.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,
        use_cache=True,
        tie_word_embeddings=d.tied,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        attention_bias=False,
        attention_dropout=0.0,
        dtype=str(dtype).replace("torch.", ""),
    )
    kw.update(special_ids or {})
    L = d.num_layers
    if arch.name == "qwen3":
        kw.update(
            use_sliding_window=False, sliding_window=None, max_window_layers=L, layer_types=["full_attention"] * L
        )
    elif arch.name == "llama":
        kw.update(mlp_bias=False, pretraining_tp=1)
    elif arch.name == "glm4_moe":
        kw.update(
            moe_intermediate_size=d.moe_ffn,
            n_routed_experts=d.experts,
            num_experts_per_tok=d.topk,
            n_shared_experts=d.shared_ffn // d.moe_ffn,
            first_k_dense_replace=d.pattern.index(1),
            norm_topk_prob=d.topk > 1,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            use_qk_norm=d.qk_norm,
        )
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 1.0}
    elif arch.name == "qwen3_moe":
        kw.update(
            moe_intermediate_size=d.moe_ffn,
            num_experts=d.experts,
            num_experts_per_tok=d.topk,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, x in enumerate(d.pattern) if not x],
            norm_topk_prob=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=L,
            layer_types=["full_attention"] * L,
        )
    elif arch.name == "mixtral":
        kw.update(
            num_local_experts=d.experts,
            num_experts_per_tok=d.topk,
            router_jitter_noise=0.0,
            sliding_window=None,
            intermediate_size=d.moe_ffn,
        )  # Mixtral's intermediate_size is the expert's
    return kw


def hf_config_json(
    cfg: Config,
    arch: HFArch,
    vocab_rows: int,
    *,
    dtype: torch.dtype,
    special_ids: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> dict:
    """config.json contents, built through the transformers class so the installed version validates it.

    Two legacy keys are added for older readers: top-level `rope_theta` and, for GLM, `partial_rotary_factor`
    (GLM's class default is 0.5; a reader that misses the nested value would silently rotate half the dims).
    """
    import transformers

    cls = getattr(transformers, arch.config_class)
    conf = cls(**hf_config_kwargs(cfg, arch, vocab_rows, dtype=dtype, special_ids=special_ids), **(extra or {}))
    conf.architectures = [arch.architecture]
    data = conf.to_dict()
    data["rope_theta"] = float(int(cfg.model.rotary_base))
    if arch.name == "glm4_moe":
        data["partial_rotary_factor"] = 1.0
    if arch.name == "qwen3_moe":
        data["num_experts"] = dims(cfg).experts  # the Hub / transformers-4 name of num_local_experts
    return data


def _rope(hf: dict) -> tuple[float, dict]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConvertError("config.json has no rope_theta")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise ConvertError(f"config.json rope_type={kind!r}: megatron here uses plain RoPE (rope_type default)")
    return float(theta), rope


def _first(hf: dict, *names):
    """The first present key: transformers renamed some fields across versions (num_experts/num_local_experts)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ConvertError(f"config.json has none of {', '.join(names)}")


def model_fields_from_hf(hf: dict) -> tuple[HFArch, dict, int]:
    """config.json -> (arch, our `model:` section, MTP heads in the file). Refuses what is not exact."""
    mt = hf.get("model_type")
    if mt not in ARCHS:
        archs = hf.get("architectures")
        raise ConvertError(
            f"config.json model_type={mt!r} (architectures {archs}) is not one of {', '.join(ARCHS)}: "
            f"wrong architecture"
        )
    arch = ARCHS[mt]

    def need(key, ok, why):
        if not ok:
            raise ConvertError(f"config.json {key}={hf.get(key)!r}: {why} (not expressible in this megatron model)")

    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "only SwiGLU (silu) MLPs")
    need("attention_bias", not hf.get("attention_bias", False), "no attention biases")
    need("mlp_bias", not hf.get("mlp_bias", False), "no MLP biases")
    need("pretraining_tp", hf.get("pretraining_tp", 1) == 1, "pretraining_tp must be 1")
    need("use_sliding_window", not hf.get("use_sliding_window", False), "no sliding-window attention")
    if mt == "mixtral":
        need("sliding_window", hf.get("sliding_window") is None, "no sliding-window attention")
    types = hf.get("layer_types")
    need("layer_types", not types or all(t == "full_attention" for t in types), "full attention only")
    theta, rope = _rope(hf)
    need("rope_theta", theta == float(int(theta)), "megatron takes an integer RoPE base")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    groups = hf.get("num_key_value_heads") or heads
    L = hf["num_hidden_layers"]
    model = dict(
        num_layers=L,
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        kv_channels=None if head_dim == hidden // heads else head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(int(theta)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        qk_layernorm=mt in ("qwen3", "qwen3_moe") or (mt == "glm4_moe" and bool(hf.get("use_qk_norm", False))),
    )
    if mt == "glm4_moe":
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        need("partial_rotary_factor", float(partial) == 1.0, "RoPE on the full head dimension only")
        topk = hf["num_experts_per_tok"]
        need(
            "n_group",
            hf.get("n_group", 1) == 1 or hf.get("topk_group") == hf.get("n_group"),
            "no group-limited routing",
        )
        need("routed_scaling_factor", float(hf.get("routed_scaling_factor", 1.0)) == 1.0, "routed scale 1.0 only")
        need(
            "norm_topk_prob",
            bool(hf.get("norm_topk_prob", True)) == (topk > 1),
            "megatron's sigmoid router normalises the top-k weights exactly when k > 1",
        )
        k = hf.get("first_k_dense_replace", 1)
        need("first_k_dense_replace", k < L, "at least one MoE layer")
        n_shared = hf.get("n_shared_experts", 1) or 0
        model["moe"] = dict(
            num_experts=_first(hf, "n_routed_experts", "num_local_experts"),
            router_topk=topk,
            ffn_hidden_size=hf["moe_intermediate_size"],
            shared_expert_hidden_size=n_shared * hf["moe_intermediate_size"] or None,
            layer_freq=[0] * k + [1] * (L - k) if k else 1,
            score_function="sigmoid",
            expert_bias=True,
        )
    elif mt == "qwen3_moe":
        need(
            "norm_topk_prob", bool(hf.get("norm_topk_prob", False)), "megatron's softmax router renormalises the top-k"
        )
        step = hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(L)]
        need("mlp_only_layers", any(pattern), "at least one MoE layer")
        model["moe"] = dict(
            num_experts=_first(hf, "num_experts", "num_local_experts"),
            router_topk=hf["num_experts_per_tok"],
            ffn_hidden_size=hf["moe_intermediate_size"],
            shared_expert_hidden_size=None,
            layer_freq=1 if all(pattern) else pattern,
            score_function="softmax",
            expert_bias=False,
        )
    elif mt == "mixtral":
        need("router_jitter_noise", not hf.get("router_jitter_noise", 0.0), "no router jitter")
        model["moe"] = dict(
            num_experts=_first(hf, "num_local_experts", "num_experts"),
            router_topk=hf["num_experts_per_tok"],
            ffn_hidden_size=hf["intermediate_size"],
            shared_expert_hidden_size=None,
            layer_freq=1,
            score_function="softmax",
            expert_bias=False,
        )
    mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
    return arch, model, mtp


def effective(cfg: Config) -> dict:
    """The fields that decide the weights and the forward, with megatron's defaults resolved."""
    d = dataclasses.asdict(dims(cfg))
    d.pop("mtp")
    if d["experts"] and all(d["pattern"]):
        d.pop("ffn")  # no dense layer: the dense FFN size is unused
    m = cfg.model
    d.update(rotary_base=float(int(m.rotary_base)), norm_epsilon=float(m.norm_epsilon))
    if m.moe.num_experts:
        d.update(score_function=m.moe.score_function)
    return d


# ---------------------------------------------------------------------------------------------------------
# Tensor plan
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One megatron tensor <-> one or more HF tensors.

    op: copy | qkv (split per query group) | glu ([gate; up]) | zeros (HF-only tensor that megatron lacks
    and that must stay zero, e.g. GLM's e_score_correction_bias when expert_bias is off).
    """

    megatron: Optional[str]
    hf: tuple
    op: str = "copy"
    fp32: bool = False  # stored in fp32 on the HF side whatever the export dtype
    shape: tuple = ()  # for op == zeros


@dataclass(frozen=True)
class Group:
    """Tensors converted together (one decoder layer, one MTP head, or the embedding/head)."""

    name: str
    rules: tuple
    head: Optional[int] = None  # 0-based MTP head (None: the main model's tensors)


def _layer_rules(arch: HFArch, d: Dims, moe_layer: bool, has_expert_bias: bool, meg: str, hf: str) -> list:
    r = [
        Rule(f"{meg}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
        Rule(
            f"{meg}self_attention.linear_qkv.weight",
            (f"{hf}self_attn.q_proj.weight", f"{hf}self_attn.k_proj.weight", f"{hf}self_attn.v_proj.weight"),
            "qkv",
        ),
        Rule(f"{meg}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
    ]
    if d.qk_norm:
        r += [
            Rule(f"{meg}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
            Rule(f"{meg}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",)),
        ]
    r.append(Rule(f"{meg}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)))
    if not moe_layer:
        return r + [
            Rule(f"{meg}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "glu"),
            Rule(f"{meg}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",)),
        ]
    b = f"{hf}{arch.moe_block}."
    gate, up, down = arch.expert_proj
    r.append(Rule(f"{meg}mlp.router.weight", (f"{b}gate.weight",), fp32=arch.router_fp32))
    if arch.expert_bias:
        bias = f"{b}gate.e_score_correction_bias"
        r.append(
            Rule(f"{meg}mlp.router.expert_bias", (bias,), fp32=True)
            if has_expert_bias
            else Rule(None, (bias,), "zeros", fp32=True, shape=(d.experts,))
        )
    for e in range(d.experts):
        me, he = f"{meg}mlp.experts.local_experts.{e}.", f"{b}experts.{e}."
        r += [
            Rule(f"{me}linear_fc1.weight", (f"{he}{gate}.weight", f"{he}{up}.weight"), "glu"),
            Rule(f"{me}linear_fc2.weight", (f"{he}{down}.weight",)),
        ]
    if arch.shared_expert:
        ms, hs = f"{meg}mlp.shared_experts.", f"{hf}mlp.shared_experts."
        if d.shared_ffn:
            r += [
                Rule(f"{ms}linear_fc1.weight", (f"{hs}gate_proj.weight", f"{hs}up_proj.weight"), "glu"),
                Rule(f"{ms}linear_fc2.weight", (f"{hs}down_proj.weight",)),
            ]
        else:  # Glm4Moe always builds the shared expert; zero width computes exactly zero
            r += [
                Rule(None, (f"{hs}gate_proj.weight",), "zeros", shape=(0, d.hidden)),
                Rule(None, (f"{hs}up_proj.weight",), "zeros", shape=(0, d.hidden)),
                Rule(None, (f"{hs}down_proj.weight",), "zeros", shape=(d.hidden, 0)),
            ]
    return r


def plan(cfg: Config, arch: HFArch, num_mtp: Optional[int] = None) -> list:
    """Every tensor of the model as conversion groups, in file order."""
    d = dims(cfg)
    D = d.mtp if num_mtp is None else num_mtp
    bias = bool(cfg.model.moe.expert_bias) if d.experts else False
    groups = [Group("embedding", (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),))]
    for i in range(d.num_layers):
        groups.append(
            Group(
                f"layer {i}",
                tuple(_layer_rules(arch, d, bool(d.pattern[i]), bias, f"decoder.layers.{i}.", f"model.layers.{i}.")),
            )
        )
    head = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not d.tied:
        head.append(Rule("output_layer.weight", ("lm_head.weight",)))
    groups.append(Group("head", tuple(head)))
    for k in range(D):
        meg, hf = f"mtp.layers.{k}.", f"model.layers.{d.num_layers + k}."
        rules = [
            Rule(f"{meg}enorm.weight", (f"{hf}enorm.weight",)),
            Rule(f"{meg}hnorm.weight", (f"{hf}hnorm.weight",)),
            Rule(f"{meg}eh_proj.weight", (f"{hf}eh_proj.weight",)),
        ]
        rules += _layer_rules(arch, d, d.mtp_layer_moe, bias, f"{meg}mtp_model_layer.", hf)
        rules.append(Rule(f"{meg}final_layernorm.weight", (f"{hf}shared_head.norm.weight",)))
        groups.append(Group(f"mtp head {k + 1}", tuple(rules), head=k))
    return groups


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


def _qkv_view(t: torch.Tensor, d: Dims) -> torch.Tensor:
    return t.view(d.groups, d.q_per_group + 2, d.head_dim, t.shape[-1])


def to_hf_tensors(rule: Rule, t: Optional[torch.Tensor], d: Dims) -> Iterator[tuple[str, torch.Tensor]]:
    """megatron tensor -> (HF name, tensor) pairs (views where possible; the writer makes them contiguous)."""
    if rule.op == "copy":
        yield rule.hf[0], t
    elif rule.op == "zeros":
        yield rule.hf[0], torch.zeros(rule.shape, dtype=torch.float32)
    elif rule.op == "glu":
        gate, up = torch.chunk(t, 2, dim=0)
        yield rule.hf[0], gate
        yield rule.hf[1], up
    elif rule.op == "qkv":
        v = _qkv_view(t, d)
        r, h = d.q_per_group, t.shape[-1]
        yield rule.hf[0], v[:, :r].reshape(d.groups * r * d.head_dim, h)
        yield rule.hf[1], v[:, r].reshape(d.groups * d.head_dim, h)
        yield rule.hf[2], v[:, r + 1].reshape(d.groups * d.head_dim, h)
    else:
        raise AssertionError(rule.op)


def megatron_slot(rule: Rule, part: int, dest: torch.Tensor, d: Dims) -> torch.Tensor:
    """The view of megatron tensor `dest` that HF tensor `rule.hf[part]` fills (inverse of to_hf_tensors)."""
    if rule.op == "copy":
        return dest
    if rule.op == "glu":
        return torch.chunk(dest, 2, dim=0)[part]
    if rule.op == "qkv":
        v = _qkv_view(dest, d)
        r = d.q_per_group
        return v[:, :r] if part == 0 else v[:, r + part - 1]
    raise AssertionError(rule.op)


def hf_shape_for_slot(rule: Rule, part: int, slot: torch.Tensor) -> tuple:
    """The HF tensor shape that fills `slot` (q/k/v views are per-group blocks; HF stores them flat)."""
    if rule.op == "qkv":
        return (slot.numel() // slot.shape[-1], slot.shape[-1])
    return tuple(slot.shape)


def fill_slot(slot: torch.Tensor, value: torch.Tensor, rule: Rule, part: int) -> None:
    if rule.op == "qkv":
        slot.copy_(value.view(slot.shape))
    else:
        slot.copy_(value)


def fused_expert_names(arch: HFArch, d: Dims, hf_prefix: str) -> dict:
    """transformers-5 in-memory expert names (`experts.gate_up_proj` [E, 2I, h], `experts.down_proj` [E, h, I])
    -> the per-expert Hub names they pack, for reading checkpoints written without the reverse conversion."""
    b = f"{hf_prefix}mlp.experts."
    gate, up, down = arch.expert_proj
    hb = f"{hf_prefix}{arch.moe_block}.experts."
    return {
        f"{b}gate_up_proj": [(f"{hb}{e}.{gate}.weight", f"{hb}{e}.{up}.weight") for e in range(d.experts)],
        f"{b}down_proj": [(f"{hb}{e}.{down}.weight",) for e in range(d.experts)],
    }


__all__ = [
    "ARCHS",
    "Dims",
    "Group",
    "HFArch",
    "Rule",
    "choose_arch",
    "dims",
    "effective",
    "fill_slot",
    "fused_expert_names",
    "hf_config_json",
    "hf_config_kwargs",
    "hf_shape_for_slot",
    "megatron_slot",
    "model_fields_from_hf",
    "moe_pattern",
    "plan",
    "to_hf_tensors",
]
