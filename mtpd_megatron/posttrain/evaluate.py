"""Score an HF export with heads on held-out sequences: main-head loss beside teacher-forced a_k / CAR_k / tau.

The counting is inference/acceptance.py's (acceptance_counts, acceptance_metrics: head k at t against the main
head's greedy token at t+k, chained), and the names are evaluation.py's, so the numbers read like the pretraining
experiments' (the main head's CE in nats/token, vLLM's names beside). The forward is the export's as a user
loads it: stock transformers for the main model and transformers' MtpModel for the heads (hf_mtp.py), so what
is scored is the written directory, not the training process's copy. `draft_check` then drafts with the heads
in `generate(use_mtp=True)` and checks the output equals plain greedy decoding.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch


def _vocab_limit(path: Path, rows: int) -> int:
    from mtpd_megatron.convert.to_hf import exported_vocab_size

    limit = exported_vocab_size(path)
    return rows if limit is None else min(limit, rows)


def _masked_argmax(logits: torch.Tensor, limit: int) -> torch.Tensor:
    if limit < logits.shape[-1]:  # megatron's padding rows are not tokens (generation_config suppresses them)
        logits = logits[..., :limit]
    return logits.argmax(-1)


@torch.no_grad()
def evaluate_export(
    path,
    sequences: torch.Tensor,
    *,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    label: Optional[str] = None,
    model=None,
    mtp=None,
) -> dict:
    """`sequences` [n, s+1] token ids: inputs [:, :-1], next-token labels [:, 1:]. Loads `path` unless `model`
    and `mtp` are given."""
    from transformers import AutoModelForCausalLM

    from mtpd_megatron.inference.acceptance import AcceptanceStats, acceptance_counts
    from mtpd_megatron.inference.evaluation import vllm_metrics
    from mtpd_megatron.inference.hf_mtp import load_mtp_model, teacher_forced_logits

    path = Path(path)
    device = device or torch.device("cpu")
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        mtp = load_mtp_model(model, path)
    limit = _vocab_limit(path, model.config.get_text_config().vocab_size)
    stats, loss_sum, loss_tokens = AcceptanceStats(), 0.0, 0
    t0 = time.perf_counter()
    for lo in range(0, len(sequences), batch_size):
        batch = sequences[lo : lo + batch_size].to(device)
        ids, labels = batch[:, :-1], batch[:, 1:]
        main = model(input_ids=ids).logits
        ce = torch.nn.functional.cross_entropy(main.float().transpose(1, 2), labels, reduction="none")
        loss_sum += float(ce.double().sum())
        loss_tokens += labels.numel()
        heads = teacher_forced_logits(model, mtp, ids)
        preds = torch.stack([_masked_argmax(x, limit) for x in (main, *heads)])  # [1 + K, b, s]
        acc, base = acceptance_counts(preds)
        stats.add(acc.cpu(), base.cpu(), positions=ids.numel())
    main_loss = loss_sum / loss_tokens
    metrics = stats.metrics()
    return {
        "label": label or path.name,
        "path": str(path),
        "num_heads": len(mtp.layers),
        "main_loss": main_loss,
        "main_ppl": math.exp(min(main_loss, 700.0)),
        "loss_tokens": loss_tokens,
        **metrics,
        **vllm_metrics(metrics),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def draft_check(
    path,
    prompt: torch.Tensor,
    *,
    new_tokens: int = 24,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Reload `path`, draft with all its heads through transformers' generate(use_mtp=True) (hf_mtp.enable_mtp)
    and compare with greedy decoding: {'equal', 'steps', 'accepted', 'tokens_per_step'}."""
    from transformers import AutoModelForCausalLM

    from mtpd_megatron.inference.hf_mtp import enable_mtp

    device = device or torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    mtp = enable_mtp(model, path)
    prompt = prompt.view(1, -1).to(device)
    greedy = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    drafted = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_mtp=True)
    record = mtp.mtp_record
    steps = len(record["drafts"])
    return {
        "equal": bool(torch.equal(greedy, drafted)),
        "steps": steps,
        "accepted": list(record["accepted"]),
        "new_tokens": int(drafted.shape[1] - prompt.shape[1]),
        "tokens_per_step": (drafted.shape[1] - prompt.shape[1]) / max(steps, 1),
    }
