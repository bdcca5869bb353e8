"""The typed configuration tree. YAML only serialises it; every field has a default and a docstring.

Sections mirror what a Megatron-LM user sets on the command line, grouped the way torchtitan groups its
job config: model, parallel, mtp (+ mtpd), data, training, checkpoint, logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


def doc(text: str, default=None, factory=None):
    """A dataclass field whose help text is kept in its metadata (shown by `--help-config`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class MoEConfig:
    num_experts: int = doc("Routed experts per MoE layer; 0 means a dense model.", 0)
    router_topk: int = doc("Experts each token is routed to.", 2)
    ffn_hidden_size: Optional[int] = doc("Hidden size of one routed expert (fine-grained experts).", None)
    shared_expert_hidden_size: Optional[int] = doc("Hidden size of the shared expert; null for none.", None)
    layer_freq: Union[int, list] = doc("1 = every layer is MoE; a 0/1 list gives the pattern per layer.", 1)
    score_function: str = doc("Router score function: softmax or sigmoid.", "softmax")
    load_balancing_type: str = doc("aux_loss, seq_aux_loss or none.", "aux_loss")
    aux_loss_coeff: float = doc("Load-balancing loss coefficient.", 1e-2)
    expert_bias: bool = doc("Aux-loss-free balancing with a learned-free expert bias (needs sigmoid).", False)
    token_dispatcher: str = doc("alltoall or allgather (alltoall is the one to use with EP > 1).", "alltoall")
    experts_backend: str = doc(
        "auto (torch grouped GEMM on the torch-native path, i.e. when TE is absent; "
        "megatron's experts with TE), grouped, or sequential (megatron's SequentialMLP "
        "loop). Same parameters and checkpoint keys either way.",
        "auto",
    )


@dataclass
class ModelConfig:
    num_layers: int = doc("Decoder layers (MTP heads not counted).", 2)
    hidden_size: int = doc("Model width.", 64)
    ffn_hidden_size: int = doc("SwiGLU hidden size of dense layers.", 176)
    num_attention_heads: int = doc("Query heads.", 4)
    num_query_groups: Optional[int] = doc("Key/value heads for GQA; null = num_attention_heads.", None)
    kv_channels: Optional[int] = doc("Head dimension; null = hidden_size / num_attention_heads.", None)
    vocab_size: Optional[int] = doc("Vocabulary size; null = read from the tokenizer.", None)
    make_vocab_size_divisible_by: int = doc("Pad the vocabulary to a multiple of this times TP.", 128)
    max_position_embeddings: int = doc("Longest sequence RoPE is set up for.", 4096)
    rotary_base: float = doc("RoPE base frequency.", 10000.0)
    norm_epsilon: float = doc("RMSNorm epsilon.", 1e-6)
    qk_layernorm: bool = doc("RMSNorm on queries and keys (Qwen3-style).", False)
    tie_embeddings: bool = doc("Share the input embedding and the output layer.", False)
    init_method_std: float = doc("Std of the normal weight init.", 0.02)
    attention_backend: str = doc("auto (TE if importable, else torch SDPA), sdpa, te or local.", "auto")
    compile_layers: bool = doc(
        "Fused elementwise kernels without TE: megatron's torch.compile'd SwiGLU "
        "(bias_activation_fusion), torch.compile'd RMSNorm modules and RoPE (apply_rope_fusion), "
        "and in bf16 megatron's fused cross entropy (cross_entropy_loss_fusion) "
        "(tools/bench_train.py --compare compile_layers measures it).",
        False,
    )
    init_on_device: bool = doc(
        "Draw the initial weights on the GPU (megatron's default; fast for billions of "
        "parameters) instead of on the host (the default here: the same weights for every "
        "TP/EP layout). Ignored without a GPU.",
        False,
    )
    moe: MoEConfig = doc("Mixture-of-experts settings.", factory=MoEConfig)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = doc("TP: shards attention heads, MLP and vocabulary.", 1)
    pipeline_model_parallel_size: int = doc("PP stages (MTP heads live on the last stage).", 1)
    expert_model_parallel_size: int = doc("EP: ranks the experts are spread over.", 1)
    expert_tensor_parallel_size: Optional[int] = doc("ETP; null = same as TP. 1 is best for small experts.", None)
    context_parallel_size: int = doc(
        "CP: splits every sequence over ranks (2 load-balanced chunks each; long context).", 1
    )
    sequence_parallel: bool = doc("Split activations along the sequence in TP regions (needed by MoE at TP>1).", False)
    use_distributed_optimizer: bool = doc("Shard optimizer state over data-parallel ranks.", True)


@dataclass
class MTPDConfig:
    enabled: bool = doc("Add the self-distillation KL to every MTP head's loss.", True)
    alpha: Union[float, list] = doc("Weight of each head's cross-entropy (scalar or one per head).", 1.0)
    beta: Union[float, list] = doc("Weight of each head's KL to the main head (scalar or one per head).", 1.0)
    topn: int = doc("Teacher TopN logits kept; 0 or >= vocab means the full vocabulary.", 10000)
    direction: str = doc("forward = KL(teacher||head) (default), reverse = KL(head||teacher).", "forward")
    mode: str = doc(
        "renorm: both renormalised over the teacher's TopN; tail: TopN + one bucket for the rest.", "renorm"
    )
    temperature: float = doc("Softmax temperature of the KL (the KL is multiplied by T^2).", 1.0)
    objective: str = doc(
        "kl (the paper), or lk = lk_lambda * KL + (1 - lk_lambda) * total variation "
        "(the LK loss of arXiv 2602.23881, aimed at acceptance).",
        "kl",
    )
    lk_lambda: float = doc("objective lk: weight of the KL against total variation, in [0, 1].", 0.5)
    detach_teacher: bool = doc(
        "The paper's stop-gradient on the teacher (main head). false = the seesaw "
        "ablation: the KL also pulls the main head towards the heads.",
        True,
    )
    kl_to_trunk: bool = doc(
        "The KL's gradient reaches the shared trunk (decoder, embeddings, output layer) "
        "through the heads. false = it trains the heads only (CE still flows); costs "
        "a second forward/backward of the heads.",
        True,
    )
    fused_output_layer: bool = doc(
        "Each head's output layer + CE + TopN KL chunk by chunk over tokens with "
        "the gradients computed in the forward (mtpd/fused_head.py): no [tokens, V] "
        "logits of a head are kept for backward.",
        False,
    )
    share_teacher_logits: bool = doc(
        "Compute the main head's logits once: the teacher is their detached copy "
        "and megatron's main loss reuses them (instead of a second output layer "
        "pass).",
        False,
    )
    compile: bool = doc(
        "torch.compile the MTP-D loss's chunk kernels on CUDA (false = eager, for debugging or "
        "timing); CPU runs are always eager.",
        True,
    )
    chunk_elems: Optional[int] = doc(
        "Logits per chunk of the MTP-D loss (memory vs. launches); null = by device "
        "(256M compiled on CUDA, 32M eager).",
        None,
    )


@dataclass
class MTPConfig:
    num_heads: int = doc("Cascaded MTP heads (megatron's mtp_num_layers); 0 disables MTP.", 4)
    loss_scaling_factor: float = doc(
        "megatron's mtp_loss_scaling_factor: each head's loss is scaled by this / num_heads.", 0.1
    )
    detach_heads: bool = doc(
        "megatron's mtp_detach_heads: no MTP gradient reaches the trunk at all (the "
        "heads train on the trunk's features, FastMTP-style); head gradients are clipped "
        "as their own group.",
        False,
    )
    mtpd: MTPDConfig = doc("Self-distillation settings.", factory=MTPDConfig)


@dataclass
class DataConfig:
    tokenizer: Optional[str] = doc("Path to a Hugging Face tokenizer.json.", None)
    paths: list = doc(
        "Indexed dataset prefixes (.bin/.idx without suffix), optionally as [weight, prefix, ...].", factory=list
    )
    split: str = doc("train,valid,test split by document, e.g. '949,50,1'.", "949,50,1")
    seq_length: int = doc("Tokens per training sample.", 128)
    cache_dir: Optional[str] = doc("Where megatron caches the sample indices; null = next to the data.", None)
    num_workers: int = doc("DataLoader workers.", 0)


@dataclass
class TrainingConfig:
    micro_batch_size: int = doc("Samples per micro-batch per data-parallel rank.", 2)
    global_batch_size: int = doc("Samples per optimizer step over all data-parallel ranks.", 4)
    train_iters: int = doc("Optimizer steps.", 100)
    lr: float = doc("Peak learning rate.", 3e-3)
    min_lr: float = doc("Final learning rate.", 3e-4)
    lr_schedule: str = doc("cosine, wsd or constant (after linear warmup).", "cosine")
    lr_warmup_iters: int = doc("Linear warmup steps.", 10)
    wsd_decay_iters: Optional[int] = doc("Steps of the WSD decay phase (wsd only).", None)
    weight_decay: float = doc("AdamW weight decay.", 0.1)
    adam_beta1: float = doc("AdamW beta1.", 0.9)
    adam_beta2: float = doc("AdamW beta2.", 0.95)
    adam_eps: float = doc("AdamW epsilon.", 1e-8)
    fused_adam: bool = doc(
        "torch's fused AdamW kernel (fused=True) where megatron falls back to torch's "
        "foreach AdamW (no TE/apex); same update, fewer kernel launches.",
        False,
    )
    foreach_multi_tensor: bool = doc(
        "Gradient-norm, clipping and main-to-model copies on torch's foreach kernels where "
        "megatron falls back to its per-tensor loops without TE/apex (one host sync per "
        "parameter in the grad norm); same math, a few launches per step (optim.py).",
        False,
    )
    clip_grad: float = doc("Global gradient-norm clip; 0 disables.", 1.0)
    precision: str = doc("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", "auto")
    seed: int = doc("Seed for weights, data order and dropout.", 1234)
    eval_interval: int = doc("Steps between validation runs; 0 disables.", 50)
    eval_iters: int = doc("Micro-batches per validation run.", 4)
    max_consecutive_nan_steps: int = doc("Stop after this many non-finite losses in a row.", 5)
    device: str = doc("auto, cpu or cuda.", "auto")


@dataclass
class CheckpointConfig:
    save: Optional[str] = doc("Directory for checkpoints; null disables saving.", None)
    load: Optional[str] = doc("Directory to resume from; null = same as save.", None)
    save_interval: int = doc("Steps between checkpoints; 0 = only at the end and on preemption.", 0)
    keep_last: int = doc("Complete checkpoints kept (older ones deleted); 0 keeps all.", 2)
    async_save: bool = doc("Write checkpoints in the background (torch_dist async).", False)
    resume: str = doc("auto (newest complete checkpoint if any), none, or a checkpoint directory.", "auto")


@dataclass
class LoggingConfig:
    log_interval: int = doc("Steps between log lines.", 10)
    tensorboard_dir: Optional[str] = doc("TensorBoard event directory; null = <save>/tensorboard or none.", None)
    wandb_project: Optional[str] = doc("Weights & Biases project; null disables W&B.", None)
    progress_bar: str = doc("auto (on a terminal), on or off.", "auto")


@dataclass
class StageConfig:
    """One looped-extension stage: train with `heads` MTP heads, starting from the previous stage."""

    heads: int = doc("MTP heads after this stage (m'); the previous stage had m.", 1)
    init: str = doc("New heads m+1..m': copy (head m+j <- head j, the paper), repeat-last or random.", "copy")
    freeze_main: bool = doc("Freeze the main model (embeddings, decoder, output layer).", True)
    train_old_heads: bool = doc("Keep training heads 1..m (default: frozen).", False)
    train_iters: int = doc("Optimizer steps of this stage (its token budget).", 100)
    lr: Optional[float] = doc("Peak LR of this stage; null = training.lr.", None)
    min_lr: Optional[float] = doc("Final LR of this stage; null = training.min_lr.", None)
    lr_warmup_iters: Optional[int] = doc("Warmup of this stage; null = training.lr_warmup_iters.", None)
    lr_schedule: Optional[str] = doc("Schedule of this stage; null = training.lr_schedule.", None)


@dataclass
class LoopedConfig:
    root: Optional[str] = doc("Directory of the stage checkpoints (stage_<i>/); null = checkpoint.save.", None)
    stages: list = doc(
        "Stages in order; stage 0 trains from scratch (nothing frozen), later ones extend.", factory=list
    )


@dataclass
class Config:
    name: str = doc("Run name (used in log lines and metadata).", "mtpd")
    model: ModelConfig = doc("Model architecture.", factory=ModelConfig)
    parallel: ParallelConfig = doc("Parallel layout.", factory=ParallelConfig)
    mtp: MTPConfig = doc("Multi-token prediction heads and MTP-D.", factory=MTPConfig)
    data: DataConfig = doc("Data and tokenizer.", factory=DataConfig)
    training: TrainingConfig = doc("Optimisation.", factory=TrainingConfig)
    checkpoint: CheckpointConfig = doc("Checkpointing and resume.", factory=CheckpointConfig)
    logging: LoggingConfig = doc("Logging.", factory=LoggingConfig)
    looped: LoopedConfig = doc("Looped extension of the MTP heads (1 -> 2 -> 4 -> 8 -> 16).", factory=LoopedConfig)
