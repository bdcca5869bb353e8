"""Typed switches of the decoder (`SpeculativeDecoder(options=DecodeOptions(...))`), one per cost cut.

Each switch can be turned on or off alone so that `tools/bench_decode.py --ablate` measures each against the
same-run baseline; none of them changes the output tokens (the output is always the main model's greedy
text, checked in fp32 by tests/test_inference.py). What they change is the cost of a step, and in bf16
which GEMM kernels run (see `verify_width`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

GRAPH_SCOPES = ("step", "phase")
# torch.compile modes that leave CUDA graphs to the decoder (inductor's own cudagraph trees would nest in ours).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class DecodeOptions:
    """How one decoding step is executed.

    cuda_graphs: capture the step in CUDA graphs (CUDA, TP=1). On CPU `SpeculativeDecoder` refuses it; the
        bench tool turns it off there (documented no-op, `--cuda-graphs` defaults on).
    graph_scope: "step" = one graph for verify + every draft depth (no host involvement inside a step);
        "phase" = one graph for the verify and one per draft depth, replayed back to back. Adaptive drafting
        and `host_sync_per_depth` need "phase" (the host decides between depths) and select it by themselves.
    sync_every: decoding steps between two host reads of the lengths (1 = the host looks after every step).
    host_sync_per_depth: the host reads the drafts after every depth, as a decoder that computes acceptance on
        the host would (the "off" side of "acceptance computed on device").
    compile: torch.compile (inductor) of each piece of a step -- the verify's main model, the acceptance, each
        draft depth, and the prefill's main model (SpeculativeDecoder.piece), whatever the graph scope -- as one
        graph with no break (megatron's layers, our cache attention and the bookkeeping), inside the CUDA graph
        when that is on; static shapes, compiled once per batch size and width.
    compile_mode: torch.compile's mode for `compile`: "default", or "max-autotune-no-cudagraphs" (inductor
        benchmarks Triton GEMM templates against cuBLAS per shape: a lever for the batch-1 GEMVs, which run at
        1.4-3.2 TB/s with cuBLAS on an H200; much longer warm-up). The prefill's pieces stay in the default mode
        (SpeculativeDecoder.piece_compile_mode).
    draft_vocab: > 0: the heads propose only among this many token ids, the most frequent ones of the decoder's
        `token_ranking` (a frequency-ranked draft vocabulary, as FR-Spec): each depth's output GEMM and argmax
        read draft_vocab rows instead of V. Lossless (the verify keeps the whole vocabulary); a draft outside
        that set is never proposed. TP=1. 0 = the whole vocabulary.
    fused_prologue: each MTP head's enorm + hnorm + concat + eh_proj as one normalisation over the concatenated
        [embedding, hidden] and one GEMM over weights with the norm gains folded in (pre-concatenated, refreshed
        from the megatron modules at every `generate`); TP=1.
    argmax_chunk: > 0: greedy tokens from the output layer in vocabulary chunks of this many rows (GEMM + max per
        chunk, running winner), never materialising the [positions, V] logits; TP=1. 0 = megatron's output layer.
    verify_width: positions of every verify forward (None = k + 1). A greedy decoder (k=0) with
        verify_width = K + 1 runs exactly the kernels of the K-draft verify (the extra rows are padding), so in
        bf16 its tokens equal the speculative tokens bit for bit: the "exact greedy" of the bench.
    draft_threshold: stop proposing drafts at the first head whose top-1 probability (softmax of its logits) is
        below this; deeper heads are skipped too unless their cache would fall more than `max_skips` steps behind.
    max_skips: consecutive steps a head may be skipped by adaptive drafting (its window grows by K+1 per skip).
    fp32_logits: the argmax over fp32 logits (bf16 GEMM with fp32 output) instead of megatron's bf16 ones.
    """

    cuda_graphs: bool = False
    graph_scope: str = "step"
    sync_every: int = 64
    host_sync_per_depth: bool = False
    compile: bool = False
    compile_mode: str = "default"
    draft_vocab: int = 0
    fused_prologue: bool = False
    argmax_chunk: int = 0
    verify_width: Optional[int] = None
    draft_threshold: Optional[float] = None
    max_skips: int = 3
    fp32_logits: bool = False

    def __post_init__(self):
        if self.graph_scope not in GRAPH_SCOPES:
            raise ValueError(f"graph_scope={self.graph_scope!r}: use one of {', '.join(GRAPH_SCOPES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every={self.sync_every}: must be >= 1")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab={self.draft_vocab}: must be >= 0 (0 = the whole vocabulary)")
        if self.argmax_chunk < 0:
            raise ValueError(f"argmax_chunk={self.argmax_chunk}: must be >= 0 (0 = the whole vocabulary at once)")
        if self.verify_width is not None and self.verify_width < 1:
            raise ValueError(f"verify_width={self.verify_width}: must be >= 1")
        if self.draft_threshold is not None and not 0.0 < self.draft_threshold < 1.0:
            raise ValueError(f"draft_threshold={self.draft_threshold}: must be a probability in (0, 1)")
        if self.max_skips < 0:
            raise ValueError(f"max_skips={self.max_skips}: must be >= 0")

    @property
    def adaptive(self) -> bool:
        return self.draft_threshold is not None

    @property
    def per_phase(self) -> bool:
        """Whether a step runs as separate pieces (verify, then each depth) rather than as one."""
        return self.graph_scope == "phase" or self.adaptive or self.host_sync_per_depth

    def with_(self, **changes) -> "DecodeOptions":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


# The switches `--ablate` flips one at a time (name -> the value that is "on"), against a baseline with all off.
ABLATION_SWITCHES = {  # compile last: the slowest to warm up (a time limit then loses only its row)
    "graph_per_phase": {"graph_scope": "phase"},
    "host_sync_per_step": {"sync_every": 1},
    "host_sync_per_depth": {"host_sync_per_depth": True},
    "fused_prologue": {"fused_prologue": True},
    "argmax_chunk": {"argmax_chunk": 16384},
    "compile": {"compile": True},
    "compile_autotune": {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"},
}


def option_names() -> list:
    return [f.name for f in fields(DecodeOptions)]
