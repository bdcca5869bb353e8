"""Inference: teacher-forced MTP acceptance and greedy / self-speculative decoding on megatron models.

* acceptance.py -- a_k, CAR_k, tau of the MTP heads against the main head (teacher forcing) beside the main
                  head's validation loss, TP/DP aware.
* decoder.py    -- static-KV-cache greedy and speculative decoding (exactly greedy), `speculative_demo`.
* kv_cache.py   -- the cache that replaces megatron's core attention while decoding.
* options.py    -- DecodeOptions: how a step runs (graphs, compile, fused pieces, exact greedy, adaptive K).
* fused.py      -- decode-only fused MTP head prologue and vocabulary-chunked argmax (from megatron's weights).
* profile.py    -- torch.profiler kernel tables and a grouped summary of one decoding step.
* benchmark.py, bench_report.py -- the decoding benchmark rows and their markdown tables.
"""

from mtpd_megatron.inference.acceptance import (
    AcceptanceStats,
    acceptance_counts,
    acceptance_metrics,
    evaluate_acceptance,
    evaluate_model,
    teacher_forced_outputs,
    teacher_forced_predictions,
    vocab_parallel_argmax,
)
from mtpd_megatron.inference.decoder import Generation, SpeculativeDecoder, generate, speculative_demo
from mtpd_megatron.inference.options import DecodeOptions

__all__ = [
    "AcceptanceStats",
    "acceptance_counts",
    "acceptance_metrics",
    "evaluate_acceptance",
    "evaluate_model",
    "teacher_forced_outputs",
    "teacher_forced_predictions",
    "vocab_parallel_argmax",
    "Generation",
    "SpeculativeDecoder",
    "generate",
    "speculative_demo",
    "DecodeOptions",
]
