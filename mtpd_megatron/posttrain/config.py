"""The post-training configuration: a typed dataclass tree read from YAML, dotted overrides and flags.

The heads' objective is the pretraining one, from the same typed section (`mtp:`, schema.MTPConfig): per-head
alpha/beta, TopN, temperature, direction, mode and objective of the MTP-D loss, `loss_scaling_factor` (each head's
loss is scaled by it / num_heads, as megatron does) and `detach_heads`. What post-training adds is what to do
with the heads (`heads: mtpd | ce | frozen`), where the export is, the new domain's text and DeepSpeed's ZeRO
stage. Every mistake is one ConfigError line naming the field and the fix (CLIs exit with 2), raised before
any process group, model or file exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from mtpd_megatron.config.load import ConfigError, dataclass_from_dict, read_yaml
from mtpd_megatron.config.schema import MTPConfig, doc

HEAD_MODES = ("mtpd", "ce", "frozen")
ZERO_STAGES = (2, 3)
DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
STDLIB = "stdlib"  # data.paths entry: this interpreter's standard library sources (tests excluded)


@dataclass
class ExportSection:
    path: Optional[str] = doc(
        "The Hugging Face export to fine-tune (tools/convert_to_hf.py output with MTP heads).", None
    )
    dtype: str = doc(
        "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32: training precision (bf16 keeps fp32 master "
        "weights in DeepSpeed) and the dtype of the written export.",
        "auto",
    )


@dataclass
class PosttrainData:
    paths: list = doc(
        "Text of the new domain: 'stdlib' (this Python's standard library .py files, tests "
        "excluded), directories (files matching data.glob, recursively), .jsonl files ({'text': ...} "
        "per line) or plain text files.",
        factory=lambda: [STDLIB],
    )
    glob: str = doc("Files taken from a directory entry of data.paths.", "*.py")
    seq_length: int = doc("Tokens per training and held-out sequence.", 512)
    valid_fraction: float = doc(
        "Share of documents held out (chosen by a hash of the document's name, so the "
        "split is the same in every run and on every machine).",
        0.05,
    )
    max_train_tokens: int = doc("Cap on the training tokens kept (0 = all).", 0)
    valid_sequences: int = doc("Held-out sequences scored for acceptance and main-head loss.", 64)


@dataclass
class PosttrainTraining:
    train_iters: int = doc("Optimizer steps.", 100)
    micro_batch_size: int = doc("Sequences per micro-batch per data-parallel rank.", 8)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    lr: float = doc("Peak learning rate (fine-tuning: far below pretraining's).", 1e-4)
    min_lr: float = doc("Final learning rate of the cosine decay.", 1e-5)
    lr_warmup_iters: int = doc("Linear warmup steps.", 10)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    adam_beta1: float = doc("AdamW beta1.", 0.9)
    adam_beta2: float = doc("AdamW beta2.", 0.95)
    adam_eps: float = doc("AdamW epsilon.", 1e-8)
    clip_grad: float = doc("Global gradient-norm clip (DeepSpeed's gradient_clipping); 0 disables.", 1.0)
    seed: int = doc("Seed for the data order.", 1234)
    device: str = doc("auto, cpu or cuda.", "auto")
    log_interval: int = doc("Steps between log lines.", 10)
    eval_batch_size: int = doc("Held-out sequences per forward when scoring.", 8)


@dataclass
class DeepSpeedSection:
    zero_stage: int = doc(
        "ZeRO stage: 2 (optimizer state and gradients partitioned over data-parallel ranks) or 3 (the parameters too).",
        2,
    )


@dataclass
class PosttrainConfig:
    name: str = doc("Run name (log lines, the run record).", "posttrain")
    heads: str = doc(
        "What the MTP heads learn: mtpd (CE + beta * TopN KL to the detached main head, per mtp.mtpd), "
        "ce (their CE only) or frozen (kept as exported; only the main model trains).",
        "mtpd",
    )
    model: ExportSection = doc("The export to start from.", factory=ExportSection)
    mtp: MTPConfig = doc(
        "The heads' objective, as in pretraining (mtp.num_heads: default = the export's heads).", factory=MTPConfig
    )
    data: PosttrainData = doc("The new domain's text.", factory=PosttrainData)
    training: PosttrainTraining = doc("Optimisation.", factory=PosttrainTraining)
    deepspeed: DeepSpeedSection = doc("DeepSpeed ZeRO.", factory=DeepSpeedSection)
    out: Optional[str] = doc("Directory of the fine-tuned export (written whole or not at all).", None)
    overwrite: bool = doc("Replace an existing `out`.", False)


def load_posttrain_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> PosttrainConfig:
    """YAML (optional) + dotted overrides -> PosttrainConfig; mtp.num_heads defaults to the export's heads."""
    from mtpd_megatron.config.load import parse_overrides

    data = read_yaml(path) if path else {}
    overrides = list(overrides)
    cfg = dataclass_from_dict(PosttrainConfig, data, overrides)
    given = "num_heads" in (data.get("mtp") or {}) or any(k == "mtp.num_heads" for k, _ in parse_overrides(overrides))
    if not given and cfg.model.path and Path(cfg.model.path).is_dir():
        heads = export_heads(cfg.model.path)
        if heads:
            cfg.mtp.num_heads = heads
    return cfg


def export_heads(path: str) -> int:
    """Number of MTP heads an export holds (0 without any); a one-line ConfigError for a broken export."""
    from mtpd_megatron.inference.hf_mtp import MTPHeadsError, locate_heads

    try:
        return int(locate_heads(path)["num_heads"])
    except MTPHeadsError as e:
        raise ConfigError(f"model.path {e}") from None


def export_vocab_rows(path: str) -> Optional[int]:
    """The export's vocabulary rows (config.json vocab_size), None when unreadable."""
    import json

    try:
        conf = json.loads((Path(path) / "config.json").read_text())
        return int((conf.get("text_config") or conf)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fail(field: str, value, problem: str) -> None:
    from mtpd_megatron.config.validate import _show

    raise ConfigError(f"{field}={_show(value)}: {problem}")


def _positive_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "must be an integer >= 1")


def validate_posttrain(cfg: PosttrainConfig, vocab_rows: Optional[int] = None) -> None:
    """Raise ConfigError (one line) unless `cfg` can run: values, the export and its heads, the output path."""
    from mtpd_megatron.config.schema import Config
    from mtpd_megatron.config.validate import _check_mtp

    if cfg.heads not in HEAD_MODES:
        _fail("heads", cfg.heads, f"must be one of {', '.join(HEAD_MODES)}")
    if cfg.deepspeed.zero_stage not in ZERO_STAGES:
        _fail("deepspeed.zero_stage", cfg.deepspeed.zero_stage, "must be 2 or 3 (ZeRO stage)")
    if cfg.model.dtype not in DTYPES:
        _fail("model.dtype", cfg.model.dtype, f"must be one of {', '.join(DTYPES)}")
    t = cfg.training
    if t.device not in DEVICES:
        _fail("training.device", t.device, f"must be one of {', '.join(DEVICES)}")
    for name in ("train_iters", "micro_batch_size", "gradient_accumulation_steps", "log_interval", "eval_batch_size"):
        _positive_int(f"training.{name}", getattr(t, name))
    if not 0 <= t.lr_warmup_iters <= t.train_iters:
        _fail("training.lr_warmup_iters", t.lr_warmup_iters, f"must be in [0, training.train_iters={t.train_iters}]")
    for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
        value = getattr(t, name)
        if not (0 <= value < math.inf) or (name in ("lr", "adam_eps") and value == 0):
            _fail(
                f"training.{name}",
                value,
                "must be a finite number " + (">= 0" if name not in ("lr", "adam_eps") else "> 0"),
            )
    if t.min_lr > t.lr:
        _fail("training.min_lr", t.min_lr, f"exceeds training.lr={t.lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            _fail(f"training.{name}", getattr(t, name), "must be in [0, 1)")
    d = cfg.data
    if not d.paths:
        _fail("data.paths", d.paths, "is empty (give 'stdlib', directories or text files)")
    for p in d.paths:
        if not isinstance(p, str):
            _fail("data.paths", d.paths, "entries must be paths (strings) or 'stdlib'")
        if p != STDLIB and not os.path.exists(p):
            _fail("data.paths", p, "no such file or directory (use 'stdlib' for the standard library sources)")
    _positive_int("data.seq_length", d.seq_length)
    _positive_int("data.valid_sequences", d.valid_sequences)
    if not 0 < d.valid_fraction < 1:
        _fail("data.valid_fraction", d.valid_fraction, "must be in (0, 1)")
    if isinstance(d.max_train_tokens, bool) or d.max_train_tokens < 0:
        _fail("data.max_train_tokens", d.max_train_tokens, "must be >= 0 (0 = all)")

    if not cfg.model.path:
        raise ConfigError("model.path: not set (pass --model EXPORT, a tools/convert_to_hf.py output with MTP heads)")
    if not os.path.isdir(cfg.model.path):
        _fail("model.path", cfg.model.path, "no such directory (pass a Hugging Face export with MTP heads)")
    available = export_heads(cfg.model.path)
    if not available:
        _fail(
            "model.path",
            cfg.model.path,
            "the export has no MTP heads: re-export with tools/convert_to_hf.py "
            "--mtp sidecar or attach them with tools/attach_mtp_heads.py",
        )
    m = cfg.mtp
    if not 1 <= m.num_heads <= available:
        _fail("mtp.num_heads", m.num_heads, f"the export has {available} MTP heads (use 1..{available})")
    if cfg.heads == "mtpd" and not m.mtpd.enabled:
        _fail("mtp.mtpd.enabled", m.mtpd.enabled, "contradicts heads=mtpd (use heads=ce for the heads' CE alone)")
    if not m.mtpd.detach_teacher:
        _fail(
            "mtp.mtpd.detach_teacher",
            m.mtpd.detach_teacher,
            "the seesaw ablation is a pretraining experiment; post-training keeps the stop-gradient (set it true)",
        )
    if not m.mtpd.kl_to_trunk:
        _fail(
            "mtp.mtpd.kl_to_trunk",
            m.mtpd.kl_to_trunk,
            "is not available in post-training (use "
            "mtp.detach_heads=true to keep every head gradient out of the main model)",
        )
    if vocab_rows is None:
        vocab_rows = export_vocab_rows(cfg.model.path)
    mtp_only = Config(mtp=m)
    mtp_only.model.make_vocab_size_divisible_by = 1
    _check_mtp(mtp_only, vocab_rows)  # the pretraining checks of the same section (field names included)

    if cfg.out is None:
        raise ConfigError("out: not set (pass --out DIR for the fine-tuned export)")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        _fail("out", cfg.out, "already exists (remove it or pass --overwrite)")
    if out.exists() and not out.is_dir():
        _fail("out", cfg.out, "is a file (pass a directory path)")
    if out.resolve() == Path(cfg.model.path).resolve():
        _fail("out", cfg.out, "is the input export (write the fine-tune to a new directory)")


def config_dict(cfg: PosttrainConfig) -> dict:
    return dataclasses.asdict(cfg)
