"""What a training run tells its user: one log line per interval, TensorBoard, W&B, metrics.jsonl, a progress bar.

Only rank 0 writes (the trainer gathers the numbers there). A line reads

    [tiny] step 40/300 | loss 5.2134 | lr 2.9e-03 | grad 0.84 | 1.2e+04 tok/s | 0.45 TFLOP/s | MFU n/a |
    skipped 0 | mtp1 ce 5.91 kl 0.32 acc 0.21 | mtp2 ... | tau 1.38 | moe load_balancing_loss 1.02

Throughput model (Megatron-LM / PaLM convention): 6 FLOPs per active weight per token for forward+backward,
where the output layer counts once for the main head and once per MTP head (they share it), plus the
MTP-D teacher's forward-only pass (2 FLOPs per weight), plus causal attention 6·s·d_attn per layer and head.
MFU divides by a dense bf16 peak looked up by device name; the CPU has no entry and prints n/a.
metrics.jsonl keeps every logged number at full precision (one JSON object per line, with `step` and
`kind` train/eval) for plots and for the tests that compare runs bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from typing import Optional

import torch

from mtpd_megatron.config.params import count_parameters
from mtpd_megatron.config.schema import Config

# Messages megatron-core 0.19.2 / torch 2.13 print on every start-up that say nothing about this run.
_NOISE_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # we use the torch-native spec on purpose (model/specs.py)
    "Apex is not installed",
    "MimoModelConfig is experimental",  # imported by megatron's optimizer package; unused
    "full scope is deprecated",  # TransformerConfig's cuda-graph default; we capture no graphs
    "The .grad attribute of a Tensor that is not a leaf Tensor",  # megatron's optimizer probing main_grad
    "When using async grad allreduce it is recommended",
    # torch DCP, on every resume through megatron's loader (world of one, positional arguments).
    "torch.distributed is disabled, unavailable or uninitialized",
    "The argument order of load has been changed",
)
_NOISE_LOGS = {
    # megatron's own DDP asks callers to pre-compute a layout it computes itself equally well.
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel: full_param_layout not provided",
    # torch_dist's synchronous save runs through the "mcore" async writer and warns about it.
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}
# A failed checkpoint write: megatron logs each worker's exception before raising it; the trainer then says
# what failed in one line (checkpoint/manager.py), so these would only bury it.
_NOISE_LOG_PREFIXES = {
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "Local worker",
        "An error is caught while starting worker",
    ),
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Silence the start-up warnings listed above so that real warnings and errors stand out."""
    for text in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=text)
    warnings.filterwarnings("ignore", category=FutureWarning, message="`torch.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, message="Please use DTensor instead")
    for name, prefix in _NOISE_LOGS.items():
        logging.getLogger(name).addFilter(_DropPrefix(prefix))
    for name, prefixes in _NOISE_LOG_PREFIXES.items():
        for prefix in prefixes:
            logging.getLogger(name).addFilter(_DropPrefix(prefix))


# Dense (non-sparse) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
    ("MI250", 362.0),
)


def peak_tflops(device: torch.device) -> Optional[float]:
    """Per-device peak for MFU, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward) of the whole model, MTP heads included."""
    m, heads = cfg.model, cfg.mtp.num_heads
    counts = count_parameters(cfg, vocab_size)
    vocab = counts["padded_vocab_size"]
    output_matmul = vocab * m.hidden_size
    body = counts["active"] - counts["embedding"] - counts["output_layer"]  # embedding lookup is not a matmul
    d_attn = m.num_attention_heads * (m.kv_channels or m.hidden_size // m.num_attention_heads)
    flops = 6.0 * (body + (1 + heads) * output_matmul)
    if heads and cfg.mtp.mtpd.enabled:
        flops += 2.0 * output_matmul  # the teacher logits (no backward)
    flops += 6.0 * (m.num_layers + heads) * cfg.data.seq_length * d_attn  # causal: half of 12·s·d
    return flops


def _duration(seconds: float) -> str:
    """3h05m, 4m10s or 12s: remaining time at the recent step rate."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"


def format_heads(metrics: dict) -> str:
    """`mtp1 ce 5.91 kl 0.32 acc 0.21 | ... | tau 1.38` from the hook's summary keys."""
    parts, k = [], 1
    while f"mtp{k}/ce" in metrics:
        parts.append(
            f"mtp{k} ce {metrics[f'mtp{k}/ce']:.3f} kl {metrics[f'mtp{k}/kl']:.3f} acc {metrics[f'mtp{k}/accept']:.3f}"
        )
        k += 1
    if "tau" in metrics:
        parts.append(f"tau {metrics['tau']:.3f}")
    return " | ".join(parts)


class RunLogger:
    """Rank 0's sinks. Every method is a no-op on other ranks."""

    def __init__(self, cfg: Config, *, enabled: bool, log_dir: Optional[str], total_iters: int, start_iter: int):
        self.cfg = cfg
        self.enabled = enabled
        self.total = total_iters
        self.tb = self.wandb = self.bar = self.jsonl = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print(
                    f"[logging] tensorboard is not installed: no event files (metrics.jsonl in {log_dir} "
                    "has every number; pip install tensorboard)"
                )
            else:
                self.tb = SummaryWriter(log_dir=log_dir)
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                self.print(
                    f"[logging] logging.wandb_project={cfg.logging.wandb_project} but wandb is not "
                    "installed: W&B logging off (pip install wandb)"
                )
            else:
                from mtpd_megatron.config.load import config_to_dict

                self.wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    name=cfg.name,
                    config=config_to_dict(cfg),
                    dir=log_dir,
                    resume="allow",
                )
        mode = cfg.logging.progress_bar
        if mode == "on" or (mode == "auto" and sys.stdout.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, desc=cfg.name, dynamic_ncols=True, leave=False)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def _record(self, kind: str, step: int, metrics: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
            self.jsonl.flush()
        prefix = "train/" if kind == "train" else "valid/"
        for key, value in metrics.items():
            if value is None or not isinstance(value, (int, float)):
                continue
            if self.tb is not None:
                self.tb.add_scalar(prefix + key, value, step)
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_train(self, step: int, m: dict) -> None:
        """One line for training step `step`; `m` holds loss, lr, grad_norm, tokens_per_s, tflops, mfu, ..."""
        if not self.enabled:
            return
        self._record("train", step, m)
        mfu = f"MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "MFU n/a"
        tflops = f"{m['tflops']:.3g} TFLOP/s" if m.get("tflops") is not None else "TFLOP/s n/a"
        grad = f"grad {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "grad n/a"
        fields = [
            f"[{self.cfg.name}] step {step}/{self.total}",
            f"loss {_fmt(m['loss'])}",
            f"lr {m['lr']:.3g}",
            grad,
            f"{m['tokens_per_s']:.3g} tok/s",
            tflops,
            mfu,
            f"skipped {m['skipped_steps']}",
        ]
        heads = format_heads(m)
        if heads:
            fields.append(heads)
        moe = [f"moe {k[4:]} {v:.4g}" for k, v in m.items() if k.startswith("moe/")]
        fields.extend(moe)
        if m.get("step_time_s") and step < self.total:
            fields.append(f"ETA {_duration(m['step_time_s'] * (self.total - step))}")
        self.print(" | ".join(fields))

    def log_eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self._record("eval", step, m)
        line = f"[{self.cfg.name}] validation at step {step} | loss {_fmt(m['loss'])} | ppl {math.exp(min(m['loss'], 50)):.4g}"
        heads = format_heads(m)
        self.print(line + (" | " + heads if heads else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = self.bar = self.jsonl = None
