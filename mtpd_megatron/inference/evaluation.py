"""Evaluate checkpoints side by side: main-head validation loss beside teacher-forced acceptance.

Shared by `tools/eval_acceptance.py` and the experiment harness (`mtpd_megatron/experiment`). Every
checkpoint is scored on the same samples (the held-out split of the first one's training data, or a jsonl
file). Acceptance is always reported with the same model's main-head loss: a weak main head is easy to
predict, so an acceptance gain bought with main-head quality is no gain (`loss_gap_warning`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

# vLLM's speculative-decoding metric names (vllm/v1/spec_decode/metrics.py, SpecDecodingLogging.log): with K drafts
# every step, its per-position acceptance rate (accepted_per_pos / drafts) is P(drafts 1..k all accepted) = CAR_k,
# its mean acceptance length (1 + accepted / drafts, bonus token included) is tau, and its draft acceptance rate
# (accepted / drafted tokens) is sum(CAR_k) / K. Derived from the same counts, so they are only other names.
VLLM_DEFINITIONS = (
    "mean_acceptance_length = tau, per_position_acceptance_rate = CAR_k, draft_acceptance_rate = "
    "sum(CAR_k) / K as a fraction (vLLM logs it in %); vLLM's names for the same teacher-forced counts"
)
DEFINITIONS = (
    "a_k = P(head k accepted | heads < k accepted), CAR_k = prod a_j, tau = 1 + sum CAR_k; "
    "teacher-forced, head k at t vs main greedy at t+k; main_loss = the main head's cross-entropy "
    "on the same tokens (nats/token, the trainer's validation loss), main_ppl = exp(main_loss)"
)
DEFINITIONS += "; " + VLLM_DEFINITIONS
LOSS_GAP = 0.01  # compared checkpoints whose main-head losses differ by more than this (relative) get a warning


def batches_of(samples: Sequence[dict], batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> list:
    """This data-parallel rank's share of `samples`, stacked into batches of dicts of [b, s] tensors."""
    mine = list(samples[dp_rank::dp_size])
    if not mine:
        raise ValueError(f"{len(samples)} samples for {dp_size} data-parallel ranks: pass --num-samples >= {dp_size}")
    return [
        {key: torch.stack([s[key] for s in mine[j : j + batch_size]]) for key in mine[0]}
        for j in range(0, len(mine), batch_size)
    ]


def evaluate_loaded(
    loaded, samples: Sequence[dict], *, batch_size: int = 8, max_k: Optional[int] = None, label: Optional[str] = None
) -> dict:
    """One checkpoint (a `LoadedModel`): main-head loss/ppl, and a_k/CAR_k/tau when it has MTP heads."""
    from megatron.core import parallel_state

    from mtpd_megatron.inference.acceptance import evaluate_model, num_heads

    batches = batches_of(
        samples, batch_size, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    t0 = time.perf_counter()
    metrics = evaluate_model(loaded.model, batches, vocab_limit=loaded.vocab_size, max_k=max_k)
    return {
        "label": label or loaded.label,
        "path": str(loaded.path),
        "iteration": loaded.meta.get("iteration"),
        "num_heads": num_heads(loaded.model),
        "mtpd": bool(loaded.cfg.mtp.mtpd.enabled and loaded.cfg.mtp.num_heads),
        **metrics,
        **vllm_metrics(metrics),
        "seconds": time.perf_counter() - t0,
    }


def vllm_metrics(metrics: dict) -> dict:
    """vLLM's names for a/car/tau (see VLLM_DEFINITIONS): what a vLLM server with all K heads drafting every step
    would log on this text. An empty dict for a model without heads."""
    car = metrics.get("car") or []
    if not car:
        return {}
    return {
        "mean_acceptance_length": metrics["tau"],
        "per_position_acceptance_rate": list(car),
        "draft_acceptance_rate": sum(car) / len(car),
    }


def loss_gap_warning(results: Sequence[dict], threshold: float = LOSS_GAP) -> Optional[str]:
    """One line when the compared checkpoints' main-head losses differ by more than `threshold` (relative)."""
    if len(results) < 2:
        return None
    best = min(results, key=lambda r: r["main_loss"])
    worst = max(results, key=lambda r: r["main_loss"])
    gap = worst["main_loss"] / best["main_loss"] - 1.0
    if gap <= threshold:
        return None
    return (
        f"warning: main-head losses differ by {100 * gap:.1f}% ({worst['label']}: {worst['main_loss']:.4f} vs "
        f"{best['label']}: {best['main_loss']:.4f}); acceptance of a weaker main head is easier and not comparable"
    )


def summary_lines(results: Sequence[dict]) -> list:
    """A printed table: label, main loss, ppl, tau, a_k."""
    lines = []
    for r in results:
        line = f"{r['label']}: main_loss={r['main_loss']:.4f} ppl={r['main_ppl']:.2f}"
        if r.get("a"):
            a = " ".join(f"{x:.3f}" for x in r["a"])
            line += f" tau={r['tau']:.3f} a_k=[{a}] ({r['positions']} positions)"
        else:
            line += " (no MTP heads)"
        lines.append(line)
    return lines


def plot_acceptance(result: dict, path: str) -> None:
    """Per-head a_k (left) and cumulative CAR_k (right), one series per checkpoint, each labelled with its
    main-head loss; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtpd_megatron.checkpoint.atomic import write_atomic_with

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result["checkpoints"]:
        if not r.get("a"):
            continue
        ks = list(range(1, len(r["a"]) + 1))
        name = f"{r['label']}  (tau={r['tau']:.2f}, main loss {r['main_loss']:.3f})"
        left.plot(ks, [100 * x for x in r["a"]], marker="o", label=name)
        right.plot(ks, [100 * x for x in r["car"]], marker="o", label=name)
    for ax, title in ((left, "per-head acceptance a_k"), (right, "cumulative acceptance CAR_k")):
        ax.set_xlabel("head k (predicts token t+k+1)")
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=8)
    data = result["data"]
    fig.suptitle(
        f"teacher-forced MTP acceptance on {data.get('split') or Path(data.get('jsonl', '')).name} "
        f"({data['sequences']} x {data['seq_length']} tokens)"
    )
    fig.tight_layout()
    write_atomic_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
