"""Check a loaded Config against a world size before any process group, model or file exists.

Everything megatron-core would refuse later (often after minutes of start-up on a cluster, and on every
rank at once) is refused here in one line that names the field and the fix. The checks mirror megatron's
own conditions (parallel_state.initialize_model_parallel, TransformerConfig.__post_init__, moe_layer.py)
plus what MTP-D needs. No torch import: the checker runs on a login node.

`environment=True` (the trainer, and the checker unless --no-env) also checks this machine: that
Transformer Engine is installed when the config asks for it, and that the output paths (checkpoint.save,
logging.tensorboard_dir, data.cache_dir) are directories or can be created as such. Those are checked
here rather than where they are used because by then the run has joined a process group and written
tensorboard files; a path that is a file fails first thing instead.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from typing import Any, Optional

from mtpd_megatron.config.load import ConfigError
from mtpd_megatron.config.params import moe_layer_pattern, padded_vocab
from mtpd_megatron.config.schema import Config

ATTENTION_BACKENDS = ("auto", "sdpa", "te", "local")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
DISPATCHERS = ("alltoall", "allgather")
EXPERT_BACKENDS = ("auto", "grouped", "sequential")
DIRECTIONS = ("forward", "reverse")
MODES = ("renorm", "tail")
OBJECTIVES = ("kl", "lk")
LR_SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS_BARS = ("auto", "on", "off")
# set_seed (parallel/launch.py) seeds NumPy with seed + 100 * pipeline rank; NumPy takes 0..2**32 - 1.
MAX_SEED = 2**32 - 1


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null, 3, 'text')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _fail(field: str, value: Any, problem: str) -> None:
    raise ConfigError(f"{field}={_show(value)}: {problem}")


def _positive(field: str, value: Any) -> None:
    if value is None or not 0 < value < math.inf:  # also refuses nan and .inf
        _fail(field, value, "must be > 0")


def _at_least(field: str, value: Any, low: float) -> None:
    if not low <= value < math.inf:
        _fail(field, value, f"must be >= {low}")


def _one_of(field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(choices)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate(cfg: Config, world_size: int, vocab_size: Optional[int] = None, *, environment: bool = False) -> None:
    """Raise ConfigError (one line: field, problem, fix) if `cfg` cannot run on `world_size` ranks.

    `vocab_size` is the tokenizer's vocabulary size when it is known; it is needed for the TopN and
    vocabulary checks when model.vocab_size is null. `environment` adds the checks of this machine.
    """
    if not isinstance(world_size, int) or world_size < 1:
        _fail("world_size", world_size, "must be a positive number of ranks (--world-size)")
    _check_model(cfg)
    _check_moe(cfg)
    _check_parallel(cfg, world_size)
    _check_vocab(cfg, vocab_size)
    _check_mtp(cfg, vocab_size)
    _check_data(cfg)
    _check_training(cfg)
    _check_checkpoint_and_logging(cfg)
    if environment:
        check_environment(cfg)


def check_environment(cfg: Config) -> None:
    """What depends on this machine: Transformer Engine if asked for, usable output directories."""
    if cfg.model.attention_backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        _fail(
            "model.attention_backend",
            "te",
            "Transformer Engine is not installed on this machine (pip install -e .[te], or use auto / sdpa)",
        )
    for field, path in (
        ("checkpoint.save", cfg.checkpoint.save),
        ("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
        ("data.cache_dir", cfg.data.cache_dir),
    ):
        if path:
            _check_output_dir(field, path)
    if cfg.checkpoint.load and os.path.exists(cfg.checkpoint.load) and not os.path.isdir(cfg.checkpoint.load):
        _fail(
            "checkpoint.load",
            cfg.checkpoint.load,
            "is a file, not a checkpoint directory (give the save directory of the run to resume, or null)",
        )


def _check_output_dir(field: str, path: str) -> None:
    """`path` is a directory, or the nearest existing ancestor is a writable directory."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            _fail(field, path, "is a file, not a directory (point it at a directory, or move the file)")
        if not os.access(path, os.W_OK | os.X_OK):
            _fail(field, path, "is not writable (fix its permissions or point it elsewhere)")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail(field, path, f"cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(field, path, f"cannot be created: {parent} is not writable")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for name in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "max_position_embeddings",
        "rotary_base",
        "norm_epsilon",
        "init_method_std",
        "make_vocab_size_divisible_by",
    ):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("num_query_groups", "kv_channels", "vocab_size"):
        if getattr(m, name) is not None:
            _positive(f"model.{name}", getattr(m, name))
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if heads % groups:
        _fail(
            "model.num_query_groups",
            groups,
            f"must divide model.num_attention_heads={heads} (use one of {_divisors(heads)})",
        )
    if m.kv_channels is None and m.hidden_size % heads:
        _fail(
            "model.hidden_size",
            m.hidden_size,
            f"is not divisible by model.num_attention_heads={heads} "
            "(change one of them or set model.kv_channels to the head dimension)",
        )
    head_dim = m.kv_channels or m.hidden_size // heads
    if head_dim % 2:
        if m.kv_channels is not None:
            _fail(
                "model.kv_channels",
                m.kv_channels,
                "is odd; RoPE rotates pairs of channels and needs an even head dimension (use an even number)",
            )
        _fail(
            "model.hidden_size",
            m.hidden_size,
            f"gives an odd head dimension {head_dim} with "
            f"model.num_attention_heads={heads}; RoPE needs an even one (use a multiple of {2 * heads}, or set "
            "model.kv_channels to an even head dimension)",
        )
    _one_of("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    if m.attention_backend == "local" and cfg.parallel.sequence_parallel:
        _fail(
            "model.attention_backend",
            "local",
            "megatron's local spec has no sequence-parallel norm "
            "(use sdpa or auto with parallel.sequence_parallel=true)",
        )
    if cfg.data.seq_length > m.max_position_embeddings:
        _fail(
            "data.seq_length",
            cfg.data.seq_length,
            f"exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings} (raise model.max_position_embeddings or shorten the sequence)",
        )


def _check_moe(cfg: Config) -> None:
    m, moe = cfg.model, cfg.model.moe
    _at_least("model.moe.num_experts", moe.num_experts, 0)
    if not moe.num_experts:
        if cfg.parallel.expert_model_parallel_size != 1:
            _fail(
                "parallel.expert_model_parallel_size",
                cfg.parallel.expert_model_parallel_size,
                "needs an MoE model (model.moe.num_experts=0 is dense: set it to 1)",
            )
        return
    if not 1 <= moe.router_topk <= moe.num_experts:
        _fail("model.moe.router_topk", moe.router_topk, f"must be in 1..model.moe.num_experts={moe.num_experts}")
    for name in ("ffn_hidden_size", "shared_expert_hidden_size"):
        if getattr(moe, name) is not None:
            _positive(f"model.moe.{name}", getattr(moe, name))
    if isinstance(moe.layer_freq, list):
        if len(moe.layer_freq) != m.num_layers or any(x not in (0, 1) or isinstance(x, bool) for x in moe.layer_freq):
            _fail(
                "model.moe.layer_freq",
                moe.layer_freq,
                f"a list needs one 0 (dense) or 1 (MoE) per layer ({m.num_layers} entries)",
            )
    elif moe.layer_freq < 1:
        _fail("model.moe.layer_freq", moe.layer_freq, "must be >= 1 (every N-th layer is MoE) or a 0/1 list")
    _one_of("model.moe.score_function", moe.score_function, SCORE_FUNCTIONS)
    _one_of("model.moe.load_balancing_type", moe.load_balancing_type, LOAD_BALANCING)
    _one_of("model.moe.token_dispatcher", moe.token_dispatcher, DISPATCHERS)
    _one_of("model.moe.experts_backend", moe.experts_backend, EXPERT_BACKENDS)
    _at_least("model.moe.aux_loss_coeff", moe.aux_loss_coeff, 0)
    if moe.expert_bias and moe.score_function != "sigmoid":
        _fail("model.moe.expert_bias", True, "needs model.moe.score_function=sigmoid (or set expert_bias=false)")
    if moe.router_topk == 1 and moe.score_function == "softmax":
        _fail(
            "model.moe.router_topk",
            1,
            "with softmax scores gives the router no gradient (use router_topk >= 2 or score_function=sigmoid)",
        )


def _check_parallel(cfg: Config, world: int) -> None:
    p, m = cfg.parallel, cfg.model
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
    ):
        if getattr(p, name) is not None:
            _positive(f"parallel.{name}", getattr(p, name))
    if world % (tp * pp * cp):
        field, value = ("parallel.context_parallel_size", cp) if cp > 1 else ("parallel.tensor_model_parallel_size", tp)
        _fail(
            field,
            value,
            f"TP*PP*CP={tp * pp * cp} does not divide the world "
            f"size {world} (choose TP, PP and CP whose product divides {world})",
        )
    if cp > 1:
        _check_context_parallel(cfg)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if heads % tp:
        _fail(
            "parallel.tensor_model_parallel_size",
            tp,
            f"does not divide model.num_attention_heads={heads} (use one of {_divisors(heads)})",
        )
    if groups % tp:
        _fail(
            "model.num_query_groups",
            groups,
            f"is not divisible by parallel.tensor_model_parallel_size={tp} "
            f"(use a multiple of {tp} that divides {heads} heads, or a smaller TP)",
        )
    if m.num_layers % pp:
        _fail(
            "parallel.pipeline_model_parallel_size",
            pp,
            f"does not divide model.num_layers={m.num_layers} (use one of {_divisors(m.num_layers)})",
        )
    pattern = moe_layer_pattern(cfg)
    if 0 in pattern and m.ffn_hidden_size % tp:
        _fail(
            "model.ffn_hidden_size", m.ffn_hidden_size, f"is not divisible by parallel.tensor_model_parallel_size={tp}"
        )
    if p.sequence_parallel and tp == 1:
        _fail(
            "parallel.sequence_parallel",
            p.sequence_parallel,
            "needs parallel.tensor_model_parallel_size > 1 (megatron refuses it at TP=1: set it false)",
        )
    if p.sequence_parallel and cfg.data.seq_length % (tp * cp):
        where = f"parallel.tensor_model_parallel_size={tp}" if cp == 1 else f"TP*CP={tp * cp}"
        _fail("data.seq_length", cfg.data.seq_length, f"must be divisible by {where} under sequence parallelism")
    if m.moe.num_experts:
        _check_expert_parallel(cfg, world)
    elif p.expert_tensor_parallel_size not in (None, tp):
        _fail(
            "parallel.expert_tensor_parallel_size",
            p.expert_tensor_parallel_size,
            "needs an MoE model (model.moe.num_experts=0 is dense): set it to null",
        )
    t = cfg.training
    _positive("training.micro_batch_size", t.micro_batch_size)
    _positive("training.global_batch_size", t.global_batch_size)
    dp = world // (tp * pp * cp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail(
            "training.global_batch_size",
            t.global_batch_size,
            f"is not divisible by training.micro_batch_size"
            f"={t.micro_batch_size} x data-parallel size {dp} (world {world} / TP*PP*CP {tp * pp * cp}); "
            f"use a multiple of {t.micro_batch_size * dp}",
        )


def _check_context_parallel(cfg: Config) -> None:
    """CP > 1: each CP rank holds 2 of 2*CP chunks of every sequence (parallel/context.py)."""
    cp, seq = cfg.parallel.context_parallel_size, cfg.data.seq_length
    if seq % (2 * cp):
        _fail(
            "data.seq_length",
            seq,
            f"is not divisible by 2 x parallel.context_parallel_size = {2 * cp} (each "
            f"CP rank holds two chunks of the sequence): use a multiple of {2 * cp}",
        )
    if cfg.model.attention_backend == "local":
        _fail(
            "model.attention_backend",
            "local",
            "megatron's local attention has no context parallelism (use "
            "sdpa, te or auto with parallel.context_parallel_size > 1)",
        )


def _check_expert_parallel(cfg: Config, world: int) -> None:
    p, m, moe = cfg.parallel, cfg.model, cfg.model.moe
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    if tp > 1 and not p.sequence_parallel:
        _fail(
            "parallel.sequence_parallel",
            False,
            f"MoE with parallel.tensor_model_parallel_size={tp} "
            "needs sequence parallelism (set parallel.sequence_parallel=true)",
        )
    if moe.num_experts % ep:
        _fail(
            "parallel.expert_model_parallel_size",
            ep,
            f"does not divide model.moe.num_experts={moe.num_experts} (use one of {_divisors(moe.num_experts)})",
        )
    if world % (etp * ep * pp):
        _fail(
            "parallel.expert_model_parallel_size",
            ep,
            f"EP*ETP*PP={etp * ep * pp} does not divide the world size {world} (lower EP or ETP)",
        )
    expert_ffn = moe.ffn_hidden_size or m.ffn_hidden_size
    if expert_ffn % etp:
        _fail(
            "model.moe.ffn_hidden_size",
            expert_ffn,
            f"is not divisible by the expert TP size {etp} (set parallel.expert_tensor_parallel_size=1)",
        )
    if moe.shared_expert_hidden_size and moe.shared_expert_hidden_size % tp:
        _fail(
            "model.moe.shared_expert_hidden_size",
            moe.shared_expert_hidden_size,
            f"is not divisible by parallel.tensor_model_parallel_size={tp}",
        )


def _check_vocab(cfg: Config, vocab_size: Optional[int]) -> None:
    m = cfg.model
    if vocab_size is not None and vocab_size < 1:
        _fail("vocab_size", vocab_size, "the tokenizer's vocabulary must not be empty")
    if m.vocab_size is None and vocab_size is None and not cfg.data.tokenizer:
        raise ConfigError(
            "model.vocab_size and data.tokenizer are both null: set data.tokenizer to a "
            "tokenizer.json or model.vocab_size to the vocabulary size"
        )
    if m.vocab_size is not None and vocab_size is not None and m.vocab_size < vocab_size:
        _fail(
            "model.vocab_size",
            m.vocab_size,
            f"is smaller than the tokenizer's vocabulary ({vocab_size}); set it to null to read it from the tokenizer",
        )


def _weights(field: str, value: Any, heads: int) -> None:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != heads:
        _fail(field, value, f"needs one entry per MTP head (mtp.num_heads={heads}) or a single number")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
            _fail(field, value, "weights must be finite numbers >= 0")


def _check_mtp(cfg: Config, vocab_size: Optional[int]) -> None:
    mtp, d = cfg.mtp, cfg.mtp.mtpd
    _at_least("mtp.num_heads", mtp.num_heads, 0)
    _at_least("mtp.loss_scaling_factor", mtp.loss_scaling_factor, 0)
    if d.enabled and mtp.num_heads < 1:
        _fail(
            "mtp.num_heads",
            mtp.num_heads,
            "MTP-D needs at least one MTP head (set mtp.num_heads >= 1 or mtp.mtpd.enabled=false)",
        )
    _weights("mtp.mtpd.alpha", d.alpha, mtp.num_heads)
    _weights("mtp.mtpd.beta", d.beta, mtp.num_heads)
    _one_of("mtp.mtpd.direction", d.direction, DIRECTIONS)
    _one_of("mtp.mtpd.mode", d.mode, MODES)
    if not d.temperature > 0:
        _fail("mtp.mtpd.temperature", d.temperature, "must be > 0 (1.0 is the paper's setting)")
    _at_least("mtp.mtpd.topn", d.topn, 0)
    _one_of("mtp.mtpd.objective", d.objective, OBJECTIVES)
    if not 0.0 <= d.lk_lambda <= 1.0:
        _fail("mtp.mtpd.lk_lambda", d.lk_lambda, "must be in [0, 1] (1 = plain KL, 0 = total variation only)")
    if mtp.detach_heads and not d.detach_teacher:
        _fail(
            "mtp.mtpd.detach_teacher",
            d.detach_teacher,
            "contradicts mtp.detach_heads=true (no MTP gradient may reach the main model): drop one of the two",
        )
    if mtp.detach_heads and not d.kl_to_trunk:
        _fail(
            "mtp.mtpd.kl_to_trunk",
            d.kl_to_trunk,
            "is implied by mtp.detach_heads=true (nothing of the heads reaches the trunk): leave it true",
        )
    vocab = cfg.model.vocab_size or vocab_size
    if vocab is not None:
        padded = padded_vocab(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
        if d.topn > padded:
            _fail("mtp.mtpd.topn", d.topn, f"exceeds the padded vocabulary ({padded}); use 0 for the full vocabulary")


def _check_data(cfg: Config) -> None:
    data = cfg.data
    _positive("data.seq_length", data.seq_length)
    _at_least("data.num_workers", data.num_workers, 0)
    paths = data.paths
    if not paths:
        _fail(
            "data.paths",
            paths,
            "is empty: give dataset prefixes (the .bin/.idx path without suffix), "
            "e.g. [runs/data/corpus_text_document]",
        )
    weighted = not isinstance(paths[0], str)
    if weighted:
        pairs_ok = len(paths) % 2 == 0 and all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and w > 0 and isinstance(p, str) and p
            for w, p in zip(paths[0::2], paths[1::2])
        )
        if not pairs_ok:
            _fail(
                "data.paths",
                paths,
                "give either prefixes [a, b] or weight/prefix pairs [0.7, a, 0.3, b] with weights > 0",
            )
    elif not all(isinstance(p, str) and p for p in paths):
        _fail("data.paths", paths, "give either prefixes [a, b] or weight/prefix pairs [0.7, a, 0.3, b]")
    parts = str(data.split).split(",")
    try:
        shares = [float(x) for x in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(s < 0 or not math.isfinite(s) for s in shares) or sum(shares) <= 0:
        _fail("data.split", data.split, "must be up to three shares train,valid,test such as '949,50,1'")
    if shares[0] <= 0:
        _fail(
            "data.split",
            data.split,
            "has no training share (the first number is the training part: give it > 0, e.g. '949,50,1')",
        )
    if cfg.training.eval_interval > 0 and (len(shares) < 2 or shares[1] == 0):
        _fail(
            "data.split",
            data.split,
            f"has no validation share but training.eval_interval="
            f"{cfg.training.eval_interval} (give one, e.g. '949,50,1', or set training.eval_interval=0)",
        )


def _check_training(cfg: Config) -> None:
    t = cfg.training
    _positive("training.train_iters", t.train_iters)
    _positive("training.lr", t.lr)
    _at_least("training.min_lr", t.min_lr, 0)
    if t.min_lr > t.lr:
        _fail("training.min_lr", t.min_lr, f"exceeds training.lr={t.lr}")
    _one_of("training.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _at_least("training.lr_warmup_iters", t.lr_warmup_iters, 0)
    if t.lr_warmup_iters > t.train_iters:
        _fail("training.lr_warmup_iters", t.lr_warmup_iters, f"exceeds training.train_iters={t.train_iters}")
    if t.wsd_decay_iters is not None:
        if t.lr_schedule != "wsd":
            _fail(
                "training.wsd_decay_iters",
                t.wsd_decay_iters,
                f"is only used by lr_schedule=wsd "
                f"(training.lr_schedule={t.lr_schedule}: remove it or set lr_schedule=wsd)",
            )
        if not 0 < t.wsd_decay_iters <= t.train_iters - t.lr_warmup_iters:
            _fail("training.wsd_decay_iters", t.wsd_decay_iters, "must be in 1..train_iters - lr_warmup_iters")
    _at_least("training.weight_decay", t.weight_decay, 0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        if not 0 <= value < 1:
            _fail(f"training.{name}", value, "must be in [0, 1)")
    _positive("training.adam_eps", t.adam_eps)
    _at_least("training.clip_grad", t.clip_grad, 0)
    _one_of("training.precision", t.precision, PRECISIONS)
    _one_of("training.device", t.device, DEVICES)
    _at_least("training.eval_interval", t.eval_interval, 0)
    if t.eval_interval:
        _positive("training.eval_iters", t.eval_iters)
    _positive("training.max_consecutive_nan_steps", t.max_consecutive_nan_steps)
    top = MAX_SEED - 100 * (cfg.parallel.pipeline_model_parallel_size - 1)
    if not 0 <= t.seed <= top:
        _fail(
            "training.seed",
            t.seed,
            f"must be in 0..{top} (NumPy seeds are 32-bit"
            + (", and each pipeline stage adds 100)" if top != MAX_SEED else ")"),
        )


def _check_checkpoint_and_logging(cfg: Config) -> None:
    c, log = cfg.checkpoint, cfg.logging
    _at_least("checkpoint.save_interval", c.save_interval, 0)
    _at_least("checkpoint.keep_last", c.keep_last, 0)
    if not c.resume:
        _fail("checkpoint.resume", c.resume, "use auto, none or a checkpoint directory")
    _positive("logging.log_interval", log.log_interval)
    _one_of("logging.progress_bar", log.progress_bar, PROGRESS_BARS)
    if not cfg.name:
        _fail("name", cfg.name, "give the run a name")
