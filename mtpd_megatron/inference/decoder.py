"""Greedy and self-speculative decoding on a megatron GPTModel with cascaded MTP heads (batch >= 1, ragged).

Why not megatron-core's inference engine (docs/design-inference.md has the long form): its MTP speculative
path (DynamicInferenceEngine + text_generation_controller `_compute_serial_mtp_and_sample`) needs CUDA and
flash-attn's paged KV kernels (`flash_decode_and_prefill`; flash_attn is not on our GPU machine, and nothing
of it runs on CPU), and it runs each MTP layer through `forward_single_position` on one position with no KV
cache and no RoPE, while training runs every MTP layer as causal attention over all earlier positions of its
depth. Drafts from that path are not the heads' teacher-forced predictions, so measured acceptance would not
be the trained heads' acceptance. This decoder runs the trained computation exactly.

How: megatron's modules do all the math (embedding, every TransformerLayer forward, final norm, each MTP
layer's `forward_single_position` = enorm/hnorm/eh_proj/layer/final norm, the shared output layer); only
core attention is swapped for a static KV cache (kv_cache.py). State lives in device tensors, every shape is
static, so one decoding step (verify + draft) can be captured in a CUDA graph and replayed with no host sync;
the host only looks at the lengths between rounds of steps. How a step is executed (graphs, their scope,
compile, fused pieces, adaptive drafting, exact-greedy width) is a `DecodeOptions` (options.py).

Bookkeeping (per sample): tokens x_0..x_{n-1} are committed; the main model has hidden states h0 for
positions 0..p with p = n-2 (x_{n-1}, the last bonus token, has not been fed yet).
* draft: head k at position p takes h_{k-1}[p] and the token at p+k (x_{p+1} for k=1, else draft d_{k-1})
  and predicts d_k (token p+k+1). Head k attends over its own depth's past, so its cache holds entries for
  positions < p too; entries j <= p+1-k have only committed inputs and are kept ("committed", start
  c_k = p+2-k next time); entries p+2-k..p depend on this step's drafts and are recomputed next step. Each
  depth runs over a fixed window of K+k positions from c_k (positions past p are padding and never read);
  with adaptive drafting a head may be skipped for up to `max_skips` steps, so its window is K+k+S(K+1).
* verify: the main model runs positions p+1..p+W (x_{p+1}, d_1..d_K, then padding up to `verify_width` W)
  in one forward; the longest prefix of proposed drafts equal to the main greedy tokens is accepted plus one
  bonus token; n += a + 1. Rejected entries are left in place and masked (rollback = the length pointer).
So the output is token-for-token the greedy output, and the drafts are exactly the teacher-forced head
predictions on the decoded text (tests/test_inference.py checks both).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mtpd_megatron.inference.acceptance import (
    greedy_tokens,
    logits_argmax,
    max_with_first_index,
    num_heads,
    output_weight_of,
    tp_group_of,
)
from mtpd_megatron.inference.fused import FusedHeadPrologue, chunked_greedy, matmul_logits, top1_probability
from mtpd_megatron.inference.kv_cache import AttendState, KVCache, cached_attention, write_at_positions
from mtpd_megatron.inference.options import DecodeOptions

EXPLICIT_ATTENTION_UP_TO = 32  # new positions per attention call written out for inductor (kv_cache.py)
PREFILL_BUCKET = 64  # compiled prefills pad the prompt width to a multiple of this (a few static shapes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Generation:
    """Result of one `generate` call (per-sample lists; metrics pooled over the batch)."""

    tokens: list  # generated token ids per sample (prompt excluded, truncated at max_new_tokens / eos)
    k: int
    steps: list  # per sample: number of decoding steps (forwards of the main model after the prefill)
    accepted: list  # per sample: drafts accepted at each step (list of ints)
    draft_positions: list  # per sample: position p the drafts of each step were made from
    seconds: float  # wall clock of the whole call (prefill included), device synchronised
    prefill_seconds: float = 0.0
    tokens_per_step: float = 0.0  # mean of (accepted + 1) over all steps of all samples
    per_position_acceptance: list = field(default_factory=list)  # CAR_k measured: P(accepted >= k)
    per_head_acceptance: list = field(default_factory=list)  # a_k measured: P(>= k | >= k-1)
    proposed: list = field(default_factory=list)  # per sample: drafts proposed at each step (adaptive: <= k)
    depth_runs: list = field(default_factory=list)  # per head: steps in which it ran (adaptive skips heads)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "new_tokens": self.new_tokens,
            "tokens_per_second": self.new_tokens / self.seconds if self.seconds > 0 else None,
            "steps": sum(self.steps),
            "tokens_per_step": self.tokens_per_step,
            "per_position_acceptance": self.per_position_acceptance,
            "per_head_acceptance": self.per_head_acceptance,
        }


class SpeculativeDecoder:
    """Greedy (k=0) or self-speculative (1 <= k <= heads) decoding with static caches on one model.

    One instance holds buffers for sequences of up to `max_length` tokens (prompt + new) at the batch size
    of its last call (re-allocated when the batch size changes). `options.cuda_graphs` captures the step
    (or its pieces, `graph_scope`) the first time they are needed (CUDA, TP=1; checked on dense models --
    MoE token dispatch may sync with the host, then use eager). The greedy baseline (k=0) gets exactly the
    same treatment.

    Exactness: in fp32 the tokens equal greedy decoding bit for bit (and a full recompute without cache).
    In bf16 the verify forward (K+1 positions) and a greedy step (1 position) run different GEMM kernels, so
    where the top two logits are tied to within bf16 rounding they may pick different tokens. A greedy
    decoder with `verify_width=K+1` runs the verify's kernels (the "exact greedy"), and equals the K-draft
    speculative output in bf16 too.
    """

    def __init__(
        self,
        model,
        *,
        k: int = 0,
        max_length: int = 1024,
        vocab_limit: Optional[int] = None,
        options: Optional[DecodeOptions] = None,
        cuda_graphs: Optional[bool] = None,
        fp32_logits: Optional[bool] = None,
        token_ranking: Optional[Union[Sequence[int], Tensor]] = None,
    ):
        """`token_ranking`: token ids, most frequent first (e.g. `data.indexed.token_counts` of the training
        data, sorted); needed by `options.draft_vocab`, which keeps its first draft_vocab ids."""
        opts = options or DecodeOptions()
        if cuda_graphs is not None:
            opts = opts.with_(cuda_graphs=bool(cuda_graphs))
        if fp32_logits is not None:
            opts = opts.with_(fp32_logits=bool(fp32_logits))
        cfg = model.config
        heads = num_heads(model)
        if k < 0:
            raise ValueError(f"k={k}: the number of drafted tokens must be >= 0")
        if k > heads:
            raise ValueError(
                f"k={k} drafted tokens but the model has {heads} MTP heads: use k <= {heads} "
                "(each draft position needs its own trained head)"
            )
        if cfg.sequence_parallel:
            raise ValueError(
                "decoding needs parallel.sequence_parallel=false (build/load the model without "
                "sequence parallelism, e.g. at TP=1: torch_dist checkpoints reshard)"
            )
        if getattr(cfg, "pipeline_model_parallel_size", 1) > 1 or getattr(cfg, "context_parallel_size", 1) > 1:
            raise ValueError("decoding runs on a model without pipeline or context parallelism (PP=CP=1)")
        self.model = model
        self.k = k
        self.max_length = int(max_length)
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        tp = tp_group_of(model)
        cuda = self.device.type == "cuda"
        if opts.cuda_graphs and (not cuda or tp is not None):
            raise ValueError("cuda_graphs=True needs the model on a CUDA device at TP=1 (use cuda_graphs=False)")
        needs_tp1 = [
            n
            for n, on in (
                ("fused_prologue", opts.fused_prologue),
                ("argmax_chunk", opts.argmax_chunk),
                ("draft_threshold", opts.adaptive),
                ("draft_vocab", opts.draft_vocab and k),
            )
            if on
        ]
        if needs_tp1 and tp is not None:
            raise ValueError(f"{', '.join(needs_tp1)} need TP=1 (the model is tensor-parallel)")
        if opts.verify_width is not None and opts.verify_width < k + 1:
            raise ValueError(
                f"verify_width={opts.verify_width} < k+1={k + 1}: the verify forward needs a position "
                "for x_{p+1} and each draft"
            )
        self.options = opts
        self.use_graphs = opts.cuda_graphs
        self.width = opts.verify_width or k + 1  # positions per verify forward
        self.skips = opts.max_skips if (opts.adaptive and k) else 0
        # fp32_logits: the argmax is taken over fp32 logits (bf16 weights, fp32 accumulate and output) instead of
        # megatron's bf16 ones, whose rounding ties top-2 logits often enough that the verify forward and a
        # greedy step can break a tie differently. With mm(out_dtype=fp32) (CUDA) it costs no extra weight read.
        self.fp32_logits = bool(opts.fp32_logits) and self.dtype != torch.float32
        if self.fp32_logits or opts.argmax_chunk or opts.adaptive:
            self._out_weight = self._output_weight()
        if self.fp32_logits and not opts.argmax_chunk:
            self._mm_fp32_out = self._mm_out_dtype_works()
            if not self._mm_fp32_out:
                self._out_weight = self._out_weight.float()  # one fp32 copy, made once
        self._draft_ids = self._draft_weight = None
        if opts.draft_vocab and k:
            self._draft_ids = self._draft_vocabulary(opts.draft_vocab, token_ranking)
        self._prologues = None
        if opts.fused_prologue and k:
            mtp = model.mtp
            layers = [mtp.layers[0 if mtp.mtp_use_repeated_layer else d] for d in range(k)]
            self._prologues = [FusedHeadPrologue(layer) for layer in layers]
        # Token buffer, caches and hidden buffers cover drafts and window padding past the last position.
        # A sample may end up to k tokens past its limit (the last step's accepted drafts), and a finished sample
        # keeps running windows from there: p <= max_length + k - 2, verify writes up to p + width + 1, a depth
        # reads tokens up to p + window + k.
        # Rounded so that decoders of one max_length share it whatever their k: the exact greedy's compiled
        # verify is then the very graph of the K-draft verify (`_verify_main`).
        extra = 2 + k + max(self.width + 1, self._max_window() + k + 1)
        self.capacity = _round_up(self.max_length, 128) + _round_up(extra, 128)
        self.annotate = False  # record_function regions for the profiler (profile.py)
        self._phase = "step"
        self._batch = None
        self._graphs = {}
        self._compiled_pieces = {}

    def _output_weight(self) -> Tensor:
        """The [V, h] weight of the shared output layer (the embedding's when tied)."""
        weight = output_weight_of(self.model)
        return weight if weight is not None else self.model.output_layer.weight

    def _draft_vocabulary(self, size: int, ranking) -> Tensor:
        """The first `size` ids of `ranking` that the verify could also produce, ascending (equal logits then
        resolve to the lower id, as the full argmax does), on the model's device."""
        vocab = self.vocab_limit or self._output_weight().shape[0]
        if ranking is None:
            raise ValueError(
                f"draft_vocab={size} needs token_ranking (token ids, most frequent first: data.indexed.token_counts "
                "of the training data, sorted)"
            )
        if size >= vocab:
            raise ValueError(f"draft_vocab={size} >= the vocabulary ({vocab} ids): use 0 for the whole vocabulary")
        ranking = torch.as_tensor(ranking, dtype=torch.long).flatten()
        ranking = ranking[(ranking >= 0) & (ranking < vocab)]
        if ranking.numel() < size:
            raise ValueError(
                f"token_ranking has {ranking.numel()} ids below {vocab}; draft_vocab={size} needs that many"
            )
        return ranking[:size].sort().values.to(self.device)

    def _max_window(self) -> int:
        return max(self._widths(), default=0)

    def _widths(self) -> list:
        return [self.k + d + self.skips * (self.k + 1) for d in range(1, self.k + 1)]

    # ---------------------------------------------------------------------------------------------------
    # Buffers
    # ---------------------------------------------------------------------------------------------------

    def _allocate(self, batch: int) -> None:
        if self._batch == batch:
            return
        m, dev, T = self.model, self.device, self.capacity
        attn0 = m.decoder.layers[0].self_attention
        groups, dim = attn0.num_query_groups_per_partition, attn0.hidden_size_per_attention_head

        def cache():
            return KVCache.empty(batch, groups, T, dim, dtype=self.dtype, device=dev)

        self.main_caches = [cache() for _ in m.decoder.layers]
        self.mtp_caches = [cache() for _ in range(self.k)]
        h = m.config.hidden_size
        # hid[0] = main hidden after the final norm; hid[k] = output of MTP depth k (input of depth k+1).
        self.hid = [torch.zeros(batch, T, h, dtype=self.dtype, device=dev) for _ in range(max(self.k, 1))]
        self.main_hid = self.hid[0]  # what the main model's pieces touch (not the k-long list: see `piece`)
        self.seq = torch.zeros(batch, T, dtype=torch.long, device=dev)
        self.n = torch.zeros(batch, dtype=torch.long, device=dev)
        self.limit = torch.zeros(batch, dtype=torch.long, device=dev)
        self.cstart = torch.zeros(batch, max(self.k, 1), dtype=torch.long, device=dev)
        self.proposed = torch.full((batch,), self.k, dtype=torch.long, device=dev)
        self.verified = torch.zeros(batch, self.width, dtype=torch.long, device=dev)  # the verify's greedy tokens
        self.prompt_len = torch.zeros(batch, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.log_a = torch.full((self.max_length + 1, batch), -1, dtype=torch.long, device=dev)
        self.log_p = torch.zeros(self.max_length + 1, batch, dtype=torch.long, device=dev)
        self.log_d = torch.zeros(self.max_length + 1, batch, dtype=torch.long, device=dev)
        self.arange = torch.arange(T, device=dev)
        self.rows = torch.arange(batch, device=dev)
        self.row_index = self.rows.unsqueeze(1)  # [b, 1]: the sample index of in-place position writes
        rope = m.rotary_pos_emb(T)  # [T, 1, 1, d] fp32, same values megatron uses in training
        self.rope_table = rope.reshape(T, rope.shape[-1])
        # Compiled pieces get the written-out attention at decode widths (kv_cache.AttendState.explicit_up_to); one
        # bound for every decoder, so a greedy decoder of the verify's width runs the verify's attention.
        self.state = AttendState(
            rows=self.row_index, explicit_up_to=EXPLICIT_ATTENTION_UP_TO if self.options.compile else 0
        )
        self._batch = batch
        self._graphs = {}
        self._compiled_pieces = {}
        self._warm = {}
        self._stream = torch.cuda.Stream(device=self.device) if self.use_graphs else None

    # ---------------------------------------------------------------------------------------------------
    # Forwards (megatron modules, our cache)
    # ---------------------------------------------------------------------------------------------------

    def _region(self, name: str):
        if not self.annotate:
            return contextlib.nullcontext()
        return torch.profiler.record_function(name)

    def _rope(self, positions: Tensor) -> Tensor:
        return self.rope_table[positions.t()].unsqueeze(2)  # [s, b, 1, d]

    def _main(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Main model over `positions` [b, s] -> final hidden [s, b, h]; writes the main caches."""
        m = self.model
        self.state.set_positions(positions, self.capacity)
        rope = self._rope(positions)
        hidden = m.embedding(input_ids=tokens, position_ids=positions)
        for layer, kv in zip(m.decoder.layers, self.main_caches):
            self.state.kv = kv
            hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        self.state.kv = None
        return m.decoder.final_layernorm(hidden)

    def _depth(self, k: int, hidden: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        """MTP depth k (1-based) over `positions`: hidden h_{k-1} [s, b, h], tokens at positions + k."""
        mtp = self.model.mtp
        layer = mtp.layers[0 if mtp.mtp_use_repeated_layer else k - 1]
        self.state.set_positions(positions, self.capacity)
        self.state.kv = self.mtp_caches[k - 1]
        rope = self._rope(positions)
        if self._prologues is None:
            out = layer.forward_single_position(
                hidden_states=hidden,
                next_token_ids=tokens,
                position_ids=positions,
                embedding=self.model.embedding,
                rotary_pos_emb=rope,
            )
        else:  # the same modules, with enorm/hnorm/concat/eh_proj fused (fused.py)
            with self._region("head_prologue"):
                embedded = self.model.embedding(input_ids=tokens, position_ids=positions)
                x = self._prologues[k - 1](hidden, embedded)
            x, _ = layer.mtp_model_layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
            out = layer.final_layernorm(x)
        self.state.kv = None
        return out

    def _mm_out_dtype_works(self) -> bool:
        probe = torch.ones(2, 2, dtype=self.dtype, device=self.device)
        try:
            return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            return False

    def _greedy(self, hidden: Tensor, confidence: bool = False):
        """[s, b, h] -> greedy tokens [s, b] (and, with `confidence`, their softmax probability [s, b])."""
        opts = self.options
        if opts.argmax_chunk:
            limit = self.vocab_limit or self._out_weight.shape[0]
            with self._region(f"{self._phase}.output_layer+argmax"):
                tokens, prob = chunked_greedy(
                    hidden,
                    self._out_weight,
                    limit,
                    opts.argmax_chunk,
                    scale=self.model._scale_logits,
                    fp32=self.fp32_logits,
                    confidence=confidence,
                )
            return (tokens, prob) if confidence else tokens
        if not self.fp32_logits and not confidence and not self.annotate:
            return greedy_tokens(self.model, hidden, vocab_limit=self.vocab_limit)
        s, b, h = hidden.shape
        with self._region(f"{self._phase}.output_layer"):
            if self.fp32_logits:
                flat = hidden.reshape(s * b, h)
                if self._mm_fp32_out:
                    logits = torch.mm(flat, self._out_weight.t(), out_dtype=torch.float32)
                else:
                    logits = F.linear(flat.float(), self._out_weight)
                logits = logits.view(s, b, -1)
            else:
                logits, _ = self.model.output_layer(hidden, weight=output_weight_of(self.model))
        with self._region(f"{self._phase}.argmax"):
            tokens = logits_argmax(self.model, logits, vocab_limit=self.vocab_limit)
            if not confidence:
                return tokens
            logits = self.model._scale_logits(logits)
            if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
                logits = logits[..., : self.vocab_limit]
            return tokens, top1_probability(logits)

    def _draft_greedy(self, hidden: Tensor, confidence: bool = False) -> tuple:
        """A head's greedy token among the draft vocabulary: [s, b, h] -> (ids [s, b], top-1 probability within
        the draft vocabulary [s, b] or None)."""
        s, b, h = hidden.shape
        with self._region(f"{self._phase}.draft_vocab_output+argmax"):
            logits = self.model._scale_logits(
                matmul_logits(hidden.reshape(s * b, h), self._draft_weight, self.fp32_logits)
            )
            values, local = max_with_first_index(logits)
            tokens = self._draft_ids[local].view(s, b)
            return tokens, (top1_probability(logits, values).view(s, b) if confidence else None)

    @staticmethod
    def _gather_rows(buf: Tensor, index: Tensor) -> Tensor:
        """buf [b, T, h], index [b, s] -> [s, b, h]."""
        return buf.gather(1, index.unsqueeze(-1).expand(-1, -1, buf.shape[-1])).transpose(0, 1)

    def _scatter_rows(self, buf: Tensor, index: Tensor, rows: Tensor) -> None:
        """buf[b, index[b, i]] = rows[i, b] for rows [s, b, h] (in place, see kv_cache.write_at_positions)."""
        write_at_positions(buf, self.row_index, index, rows.transpose(0, 1))

    def _put_tokens(self, positions: Tensor, tokens: Tensor) -> None:
        """seq[b, positions[b, i]] = tokens[b, i]."""
        write_at_positions(self.seq, self.row_index, positions, tokens)

    def _draft_depth(self, k: int, width: int) -> None:
        """Head k at position p = n-2, over its window of `width` positions from its committed start."""
        self._phase = f"draft{k}"
        with self._region(f"draft.depth{k}"):
            p = self.n - 2
            start = self.cstart[:, k - 1]
            window = start.unsqueeze(1) + self.arange[:width]
            hidden_in = self._gather_rows(self.hid[k - 1], window)
            out = self._depth(k, hidden_in, self.seq.gather(1, window + k), window)  # [W, b, h]
            if k < self.k:
                self._scatter_rows(self.hid[k], window, out)
            at_p = out[(p - start).clamp(min=0), self.rows].unsqueeze(0)  # [1, b, h] (clamp: finished rows)
            adaptive = self.options.adaptive
            if self._draft_ids is not None:
                draft, prob = self._draft_greedy(at_p, confidence=adaptive)
            else:
                draft, prob = self._greedy(at_p, confidence=True) if adaptive else (self._greedy(at_p), None)
            if adaptive:
                confident = (self.proposed == k - 1) & (prob[0] >= self.options.draft_threshold)
                self.proposed.copy_(torch.where(confident, self.proposed + 1, self.proposed))
            self._put_tokens((p + 1 + k).unsqueeze(1), draft[0].unsqueeze(1))
            self.cstart[:, k - 1] = (p + 2 - k).clamp(min=0)

    def _draft_one(self, k: int, width: int, piece: str = "depth") -> None:
        self.piece(f"{piece}{k}", self._draft_depth)(k, width)

    def _draft(self, widths: Sequence[int], piece: str = "depth") -> None:
        for k in range(1, self.k + 1):
            self._draft_one(k, widths[k - 1], piece)

    def _verify(self) -> None:
        """Main model over x_{p+1}, d_1..d_K (+ padding to the verify width); accept the agreeing prefix + a bonus."""
        self._phase = "verify"
        with self._region("verify"):
            self.piece("verify_main", self._verify_main)()
            self.piece("accept", self._accept)()

    def _verify_window(self) -> Tensor:
        return (self.n - 1).unsqueeze(1) + self.arange[: self.width]  # [b, W]: p+1 .. p+W

    def _verify_main(self) -> None:
        """The main model's part of a verify, into `verified` [b, W]: it reads nothing that depends on k, so a
        greedy decoder of the same width runs the very same computation (compiled: the same graph)."""
        window = self._verify_window()
        hidden = self._main(self.seq.gather(1, window), window)
        self._scatter_rows(self.main_hid, window, hidden)
        self.verified.copy_(self._greedy(hidden).t())

    def _accept(self) -> None:
        """The longest prefix of drafts equal to the verified greedy tokens, a bonus token, the step's logs."""
        K = self.k
        p = self.n - 2
        window = self._verify_window()
        greedy = self.verified
        if K:
            tokens = self.seq.gather(1, window)
            match = tokens[:, 1 : K + 1] == greedy[:, :K]
            if self.options.adaptive:
                match = match & (self.arange[:K] < self.proposed.unsqueeze(1))
            accepted = match.long().cumprod(dim=1).sum(dim=1)
        else:
            accepted = torch.zeros_like(p)
        self._put_tokens(window + 1, greedy)  # d_1..d_a (unchanged), the bonus, then junk past n
        active = self.n < self.limit
        row = self.step_idx.clamp(max=self.log_a.shape[0] - 1)
        self.log_a.index_copy_(0, row, torch.where(active, accepted, -1).unsqueeze(0))
        self.log_p.index_copy_(0, row, p.unsqueeze(0))
        self.log_d.index_copy_(0, row, self.proposed.unsqueeze(0))
        self.n.copy_(torch.where(active, self.n + accepted + 1, self.n))
        self.step_idx.add_(1)
        if self.options.adaptive:
            self.proposed.zero_()

    def _step(self) -> None:
        self._verify()
        if self.k:
            self._draft(self._widths())

    def step_phases(self) -> dict:
        """The two halves of a decoding step as callables, for benchmarks that time them apart.

        {"verify": main model over K+1 positions + acceptance, "draft": the K heads (absent for k=0)}. Valid
        inside `cached_attention(model, decoder.state)` after a `generate` call; once every sample has reached
        its limit, calling them leaves the lengths unchanged, so they can be replayed any number of times.
        """
        phases = {"verify": self._verify}
        if self.k:
            widths = self._widths()
            phases["draft"] = lambda: self._draft(widths)
        return phases

    def _prefill_main(self, width: int) -> None:
        """The main model over the (padded) prompts in `seq[:, :width]`, and each prompt's first new token."""
        positions = self.arange[:width].unsqueeze(0).expand(self.seq.shape[0], width)
        hidden = self._main(self.seq[:, :width], positions)
        self._scatter_rows(self.main_hid, positions, hidden)
        last = hidden[self.prompt_len - 1, self.rows].unsqueeze(0)
        self._put_tokens(self.prompt_len.unsqueeze(1), self._greedy(last).t())

    def _prefill_device(self, width: int) -> None:
        """The main model over the prompts, the first new token, the lengths reset, each head's first drafts."""
        self.piece("prefill_main", self._prefill_main)(width)
        self.n.copy_(self.prompt_len + 1)
        self.cstart.zero_()
        self.proposed.fill_(0 if self.options.adaptive else self.k)
        if self.k:
            self._draft([width] * self.k, piece="prefill_depth")  # the prompt-wide depths: prefill pieces

    def _prefill(self, prompts: list) -> None:
        self._phase = "prefill"
        b = len(prompts)
        lengths = [len(x) for x in prompts]
        width = max(lengths)
        if self.options.compile:  # a few static prefill shapes (positions past a prompt are ragged-batch padding)
            width = min(_round_up(width, PREFILL_BUCKET), self.max_length)
        padded = torch.zeros(b, width, dtype=torch.long)
        for i, x in enumerate(prompts):
            padded[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        self.seq.zero_()
        self.seq[:, :width] = padded.to(self.device)
        self.prompt_len.copy_(torch.tensor(lengths))
        # The device part of a prefill reads only the buffers filled above: one CUDA graph per prompt width (with
        # `compile`, a few 64-token buckets), so a prefill costs its kernels, not the host launching them. One warm
        # run, so the second request of a width already replays (a prefill runs once per request; the steps'
        # pieces reach their two warm runs inside the first request).
        self._run(f"prefill{width}", lambda: self._prefill_device(width), warm_runs=1)
        self._last_run = [0] * (self.k + 1)  # adaptive: the step at which each head last ran (prefill = 0)
        self._step_no = 0
        self._depth_runs = [1] * self.k

    # ---------------------------------------------------------------------------------------------------
    # Execution: one graph per step, or one per piece (verify, each depth), or eager
    # ---------------------------------------------------------------------------------------------------

    def _run(self, name: str, fn, warm_runs: int = 2) -> None:
        """Run one piece: a graph replay once captured; before that, real eager runs.

        With graphs on, the first `warm_runs` runs of a piece are eager on a side stream (they warm up cuBLAS, the
        caching allocator and torch.compile for that stream, as torch.cuda.graph asks) and are real work of the
        generation; then the piece is recorded (recording does not execute it) and every later run, in this and
        later `generate` calls of the same batch size, is a replay.
        """
        graph = self._graphs.get(name)
        if graph is not None:
            graph.replay()
            return
        if not self.use_graphs:
            fn()
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._warm[name] = self._warm.get(name, 0) + 1
        if self._warm[name] >= warm_runs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                fn()
            self._graphs[name] = graph

    def piece(self, name: str, fn):
        """`fn` as this decoder runs it: with `options.compile`, torch.compile'd once per piece name.

        The pieces are the main model's part of a verify (`verify_main`), the acceptance (`accept`), each draft
        depth (`depth<k>`), and the prefill's main model and prompt-wide depths (`prefill_main`,
        `prefill_depth<k>`). Each traces as one graph with no break: every megatron layer it calls, our cache
        attention and the bookkeeping around it (see `_compile_ready`), so inductor fuses the glue too
        (residual add + next norm, the heads' prologue, argmax, the cache writes). The verify's main model is a
        piece of its own so that a greedy decoder of the verify's width runs the same compiled graph (dynamo's
        cache is keyed on the code and guards on shapes, not on the decoder), which keeps bf16 speculative
        output equal to that exact greedy. Shapes are static: each piece compiles once per batch size and
        width; a CUDA graph (`_run`) records the pieces' kernels like any others.
        """
        if not self.options.compile:
            return fn
        compiled = self._compiled_pieces.get(name)
        if compiled is None:
            mode = self.piece_compile_mode(name)
            compiled = self._compiled_pieces[name] = torch.compile(fn, dynamic=False, mode=mode)
        return compiled

    def piece_compile_mode(self, name: str) -> str:
        """The prefill's pieces (its main model and the heads' prompt-wide depths) are compiled in inductor's
        default mode whatever `compile_mode` says: they run once per request, and autotuning their
        64-token-bucket GEMMs outlasted a 10-minute device call at the dense_2b shape (docs/benchmarks.md, runs
        9 and 11) before any decode-width shape was reached."""
        return "default" if name.startswith("prefill") else self.options.compile_mode

    def _host_sync(self) -> None:
        self.seq[:, :1].sum().item()  # a device -> host read, as a host-side acceptance check would make

    def _advance(self) -> None:
        """One decoding step."""
        opts = self.options
        if not opts.per_phase:
            self._run("step", self._step)
            return
        self._run("verify", self._verify)
        if not self.k:
            return
        widths = self._widths()
        self._step_no += 1
        t = self._step_no
        # Adaptive: a head that has been skipped for max_skips steps runs now (its window covers no more).
        forced = max([d for d in range(1, self.k + 1) if t - self._last_run[d] > self.skips] or [0])
        for d in range(1, self.k + 1):
            if opts.adaptive and d > 1 and d > forced and not bool((self.proposed == d - 1).any()):
                break  # no sample is still drafting and no deeper head must catch up
            self._run(f"depth{d}", lambda d=d: self._draft_one(d, widths[d - 1]))
            self._last_run[d] = t
            self._depth_runs[d - 1] += 1
            if opts.host_sync_per_depth:
                self._host_sync()

    # ---------------------------------------------------------------------------------------------------
    # Public
    # ---------------------------------------------------------------------------------------------------

    def _check_request(self, prompts: list, max_new_tokens: int) -> None:
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        longest = max(len(x) for x in prompts) + max_new_tokens
        context = getattr(self.model, "max_sequence_length", None)
        if context is not None and longest > context:
            raise ValueError(
                f"prompt ({max(len(x) for x in prompts)} tokens) + {max_new_tokens} new tokens exceed the "
                f"model's context of {context} tokens (model.max_position_embeddings): shorten the "
                "prompt or ask for fewer new tokens"
            )
        if longest > self.max_length:
            raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds max_length={self.max_length}")

    @torch.no_grad()
    def generate(
        self,
        prompts: Union[Sequence[Sequence[int]], Tensor],
        max_new_tokens: int,
        eos_id: Optional[int] = None,
        max_steps_per_sync: Optional[int] = None,
    ) -> Generation:
        """Decode every prompt greedily (k=0) or speculatively; the tokens are the same either way."""
        if isinstance(prompts, Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = [list(map(int, x)) for x in prompts]
        self._check_request(prompts, max_new_tokens)
        per_sync = max_steps_per_sync or self.options.sync_every
        model = self.model
        was_training = model.training
        model.eval()
        self._allocate(len(prompts))
        if self._prologues is not None:
            for prologue in self._prologues:
                prologue.refresh()  # the folded weights follow the megatron parameters
        if self._draft_ids is not None:  # the draft rows follow the output layer (in place: graphs read them)
            weight = self._output_weight()
            if self._draft_weight is None:
                self._draft_weight = weight.new_empty(self._draft_ids.numel(), weight.shape[1])
            torch.index_select(weight, 0, self._draft_ids, out=self._draft_weight)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            with cached_attention(model, self.state), _compile_ready(self.options.compile):
                self._prefill(prompts)
                sync()
                prefill_seconds = time.perf_counter() - t0
                self.limit.copy_(torch.tensor([len(x) + max_new_tokens for x in prompts], device=self.device))
                self.step_idx.zero_()
                self.log_a.fill_(-1)
                while True:
                    n = self.n.tolist()  # the only host sync, once per round
                    left = [lim - m for lim, m in zip(self.limit.tolist(), n)]
                    if max(left) <= 0 or (eos_id is not None and self._all_ended(prompts, n, eos_id)):
                        break
                    # Each step adds at most k+1 tokens: this many steps cannot overshoot the slowest sample.
                    rounds = min(per_sync, max(1, math.ceil(max(left) / (self.k + 1))))
                    for _ in range(rounds):
                        self._advance()
                sync()
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - t0
        result = self._result(prompts, max_new_tokens, eos_id, seconds)
        result.prefill_seconds = prefill_seconds
        return result

    def _all_ended(self, prompts, n, eos_id) -> bool:
        seq = self.seq.tolist()
        return all(eos_id in seq[i][len(x) : n[i]] for i, x in enumerate(prompts))

    def _result(self, prompts, max_new_tokens, eos_id, seconds) -> Generation:
        seq, n = self.seq.tolist(), self.n.tolist()
        log_a, log_p, log_d = self.log_a.t().tolist(), self.log_p.t().tolist(), self.log_d.t().tolist()
        tokens, steps, accepted, positions, proposed = [], [], [], [], []
        for i, x in enumerate(prompts):
            out = seq[i][len(x) : min(n[i], len(x) + max_new_tokens)]
            if eos_id is not None and eos_id in out:
                out = out[: out.index(eos_id) + 1]
            tokens.append(out)
            acc = [a for a in log_a[i] if a >= 0]
            accepted.append(acc)
            positions.append([p for a, p in zip(log_a[i], log_p[i]) if a >= 0])
            proposed.append([d for a, d in zip(log_a[i], log_d[i]) if a >= 0])
            steps.append(len(acc))
        flat = [a for acc in accepted for a in acc]
        total = len(flat)
        car = [sum(a >= k for a in flat) / total if total else 0.0 for k in range(1, self.k + 1)]
        previous = [1.0] + car[:-1]
        per_head = [c / q if q else 0.0 for c, q in zip(car, previous)]
        return Generation(
            tokens=tokens,
            k=self.k,
            steps=steps,
            accepted=accepted,
            draft_positions=positions,
            seconds=seconds,
            tokens_per_step=(sum(flat) + total) / total if total else 0.0,
            per_position_acceptance=car,
            per_head_acceptance=per_head,
            proposed=proposed,
            depth_runs=list(getattr(self, "_depth_runs", [])) if self.options.per_phase else [],
        )


def _viewless_identity(inp, requires_grad, keep_graph):
    """Stands in for megatron's make_viewless_tensor inside compiled decoding (see `_compile_ready`)."""
    return inp


def _tp_group_or_default(tp_group, is_expert=False, check_initialized=True):
    """megatron.core.utils.get_tensor_model_parallel_group_if_none without its DeprecationWarning (see
    `_compile_ready`): None without torch.distributed, the given group, else megatron's default TP group."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        return None
    if tp_group is not None or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


@contextlib.contextmanager
def _compile_ready(on: bool):
    """While decoding with `compile`: two megatron lines that would break every layer into ~10 graphs, answered.

    * tensor_parallel/layers.py:830 -> utils.py:585 `get_tensor_model_parallel_group_if_none` calls
      `warnings.warn` (a DeprecationWarning: RowParallelLinear passes tp_group=None, layers.py:1466), which
      dynamo cannot trace: in tensor_parallel.layers it becomes `_tp_group_or_default`, the same lookup
      without the warning. (Telling dynamo to ignore `warnings.warn` also works, but torch 2.11 then logs a
      JSON error for its config at every compile.)
    * transformer/transformer_layer.py:1012 and multi_token_prediction.py:1271 `make_viewless_tensor` assign
      `.data`, which dynamo refuses: it becomes the identity (`_viewless_identity`). It exists to unlink views
      for pipeline-parallel buffer deallocation in training; decoding's values are the same.
    Dynamo's recompile limits are raised (a piece per draft depth and batch size). Restored on exit.
    """
    if not on:
        yield
        return
    from unittest import mock

    import torch._dynamo
    from megatron.core.tensor_parallel import layers as tp_layers
    from megatron.core.transformer import multi_token_prediction, transformer_layer

    config = {}
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            config[name] = max(getattr(torch._dynamo.config, name), 256)
    with (
        torch._dynamo.config.patch(**config),
        mock.patch.object(tp_layers, "get_tensor_model_parallel_group_if_none", _tp_group_or_default),
        mock.patch.object(transformer_layer, "make_viewless_tensor", _viewless_identity),
        mock.patch.object(multi_token_prediction, "make_viewless_tensor", _viewless_identity),
    ):
        yield


def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    k: int = 0,
    eos_id: Optional[int] = None,
    vocab_limit: Optional[int] = None,
    cuda_graphs: bool = False,
    options: Optional[DecodeOptions] = None,
) -> Generation:
    """One-off decoding (builds a decoder sized for this call)."""
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    length = max((len(x) for x in prompts), default=0) + max_new_tokens
    options = options or DecodeOptions()
    if cuda_graphs:
        options = options.with_(cuda_graphs=True)
    decoder = SpeculativeDecoder(model, k=k, max_length=length, vocab_limit=vocab_limit, options=options)
    return decoder.generate(prompts, max_new_tokens, eos_id=eos_id)


def _encode(tokenizer, text: str) -> list:
    for name in ("tokenize", "encode"):
        fn = getattr(tokenizer, name, None)
        if fn is not None:
            ids = fn(text)
            return list(ids.ids if hasattr(ids, "ids") else ids)
    raise TypeError("tokenizer needs a tokenize() or encode() method")


def _decode(tokenizer, ids: list) -> str:
    for name in ("detokenize", "decode"):
        fn = getattr(tokenizer, name, None)
        if fn is not None:
            return fn(ids)
    raise TypeError("tokenizer needs a detokenize() or decode() method")


def speculative_demo(
    model,
    tokenizer,
    prompt: str,
    k: int,
    max_new_tokens: int,
    *,
    vocab_limit: Optional[int] = None,
    options: Optional[DecodeOptions] = None,
) -> dict:
    """Decode `prompt` greedily and with k drafts; check they agree; report speed and acceptance.

    Returns dict(text, tokens_per_step, identical_to_greedy, per_position_acceptance, per_head_acceptance,
    steps, greedy_seconds, speculative_seconds, speedup, new_tokens, k).
    """
    ids = _encode(tokenizer, prompt)
    if vocab_limit is None:
        vocab_limit = getattr(tokenizer, "vocab_size", None)
    length = len(ids) + max_new_tokens
    greedy = SpeculativeDecoder(model, k=0, max_length=length, vocab_limit=vocab_limit).generate([ids], max_new_tokens)
    spec = SpeculativeDecoder(model, k=k, max_length=length, vocab_limit=vocab_limit, options=options).generate(
        [ids], max_new_tokens
    )
    return {
        "prompt": prompt,
        "text": _decode(tokenizer, spec.tokens[0]),
        "k": k,
        "new_tokens": len(spec.tokens[0]),
        "steps": spec.steps[0],
        "tokens_per_step": spec.tokens_per_step,
        "per_position_acceptance": spec.per_position_acceptance,
        "per_head_acceptance": spec.per_head_acceptance,
        "identical_to_greedy": spec.tokens == greedy.tokens,
        "greedy_seconds": greedy.seconds,
        "speculative_seconds": spec.seconds,
        "speedup": greedy.seconds / spec.seconds if spec.seconds > 0 else None,
    }
