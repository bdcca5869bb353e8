"""Teacher-forced acceptance of the MTP heads against the main head (the paper's a_k, CAR_k, tau).

For a batch of token sequences one forward gives, at every position t, the main head's greedy token m[t]
and each head's draft d_k[t] (head k at t predicts token t+k+1, like the main head at t+k). Then

    match_k[t] = d_k[t] == m[t+k]              chain_k[t] = match_1[t] and ... and match_k[t]
    acc_k = sum valid_k * chain_k              base_k = sum valid_k * chain_{k-1}    (chain_0 = 1)
    a_k = acc_k / base_k      CAR_k = prod_{j<=k} a_j      tau = 1 + sum_k CAR_k

valid_k[t] says the check exists: t+k is inside the sequence and megatron's label-aligned loss_mask[t+k] is
set (the main head's target at t+k is a real token; the rule of the training-time metric in mtpd/hook.py). The main head is the truth (greedy,
main-head-constrained verification), not the data's next token: megatron's own `mtp_k_acceptance_rate` log
compares with the data labels, which measures something else.

The forward is megatron's own, called piece by piece (embedding -> decoder -> MTP block -> the shared output
layer per chunk) so that no loss (nor the MTP-D KL hook) is computed and only one [s, b, V/tp] logits tensor
is alive at a time: each one is reduced to an argmax straight away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# ------------------------------------------------------------------------------------------------------
# Vocabulary-parallel greedy argmax
# ------------------------------------------------------------------------------------------------------


def tp_group_of(model) -> Optional[dist.ProcessGroup]:
    """The model's tensor-parallel group when TP > 1, else None."""
    group = getattr(model, "tp_group", None)
    if group is None:
        pg = getattr(model, "pg_collection", None)
        group = getattr(pg, "tp", None) if pg is not None else None
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return group


# A decoding step's argmax over a wide vocabulary runs as two reductions: the maximum of each chunk of this many
# ids, then the best chunk. Compiled, one [rows, V] max-with-index is one Triton program per row (inductor does
# not split argmax reductions): 25-29 us for 1-5 rows of 122,880 ids on an H200 (docs/benchmarks.md, run 9's
# profile), against ~2 us for the bytes.
ARGMAX_CHUNK = 2048
TWO_STAGE_MAX_ROWS = 64  # beyond this many rows the rows alone fill the GPU (teacher-forced evaluation)


def max_with_first_index(logits: Tensor) -> tuple:
    """(max, index of its first occurrence) over the last dim: torch's `max(dim=-1)`, ties included.

    For a few rows of a wide vocabulary (decoding) it is computed chunk by chunk: per-chunk maxima with their
    first index, then the first chunk holding the overall maximum. The first maximal index of the whole row is
    the first maximal index inside the first chunk that holds the maximum, so the result is identical.
    """
    vocab = logits.shape[-1]
    rows = logits.numel() // max(vocab, 1)
    if vocab < 8 * ARGMAX_CHUNK or vocab % ARGMAX_CHUNK or rows > TWO_STAGE_MAX_ROWS:
        return logits.max(dim=-1)
    chunk_max, chunk_index = logits.unflatten(-1, (vocab // ARGMAX_CHUNK, ARGMAX_CHUNK)).max(dim=-1)
    values, chunk = chunk_max.max(dim=-1)  # the first chunk holding the maximum
    index = chunk * ARGMAX_CHUNK + chunk_index.gather(-1, chunk.unsqueeze(-1)).squeeze(-1)
    return values, index


def vocab_parallel_argmax(
    logits: Tensor, *, vocab_limit: Optional[int] = None, group: Optional[dist.ProcessGroup] = None
) -> Tensor:
    """Global greedy token of logits sharded along the last (vocabulary) dim over `group`.

    Each rank takes its local max and index; (value, global index) pairs are all-gathered and the highest
    value wins, ties going to the lowest global index (torch's argmax rule, so TP>1 equals TP=1 exactly).
    `vocab_limit` masks the padding rows of a padded vocabulary (ids >= limit) so they are never chosen.
    """
    shard = logits.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    if vocab_limit is not None and vocab_limit < (rank + 1) * shard:
        ids = torch.arange(rank * shard, (rank + 1) * shard, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_limit, float("-inf"))
    values, local = max_with_first_index(logits)
    if group is None:
        return local
    world = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_index = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_index, (local + rank * shard).contiguous(), group=group)
    all_values = torch.stack(all_values)  # [world, ...]; ranks hold increasing id ranges
    winner = all_values.argmax(dim=0, keepdim=True)  # first (lowest rank) among equal maxima
    return torch.stack(all_index).gather(0, winner).squeeze(0)


def output_weight_of(model) -> Optional[Tensor]:
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None


def greedy_tokens(model, hidden: Tensor, *, vocab_limit: Optional[int] = None) -> Tensor:
    """Shared output layer + vocab-parallel argmax: [s, b, h] hidden -> [s, b] token ids."""
    logits, _ = model.output_layer(hidden, weight=output_weight_of(model))
    return logits_argmax(model, logits, vocab_limit=vocab_limit)


def logits_argmax(model, logits: Tensor, *, vocab_limit: Optional[int] = None) -> Tensor:
    """[s, b, V/tp] logits of the shared output layer -> [s, b] global greedy token ids."""
    logits = model._scale_logits(logits)  # megatron's MuP output scaling (identity otherwise)
    return vocab_parallel_argmax(logits, vocab_limit=vocab_limit, group=tp_group_of(model))


# ------------------------------------------------------------------------------------------------------
# Teacher-forced forward
# ------------------------------------------------------------------------------------------------------


def num_heads(model) -> int:
    return int(model.config.mtp_num_layers or 0) if getattr(model, "mtp", None) is not None else 0


def _forward_chunks(model, tokens: Tensor) -> list:
    """Final hidden states [s, b, h] of the main head and then of every MTP head (megatron's own modules)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    decoder_input = model.embedding(input_ids=tokens, position_ids=position_ids)
    rotary = model.rotary_pos_emb(s)
    hidden = model.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
    if getattr(model, "mtp", None) is None:
        return [hidden]
    hidden = model.mtp(
        input_ids=tokens,
        position_ids=position_ids,
        hidden_states=hidden,
        attention_mask=None,
        rotary_pos_emb=rotary,
        embedding=model.embedding,
    )
    return list(torch.chunk(hidden, 1 + num_heads(model), dim=0))


@torch.no_grad()
def teacher_forced_outputs(
    model, tokens: Tensor, *, vocab_limit: Optional[int] = None, labels: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """Greedy tokens of the main head and every MTP head, [1 + D, b, s] (row 0 = main, row k = head k), and,
    when `labels` [b, s] are given, the main head's per-token cross-entropy [b, s] (fp32, vocab-parallel).

    Mirrors GPTModel.forward for this case (embedding, RoPE over the sequence, decoder, MTP block with
    megatron's own rolling of the inputs) but stops before any loss hook. The cross-entropy is the trainer's
    (megatron's vocab_parallel_cross_entropy over the padded vocabulary), so it is the validation loss the
    training log prints. `tokens` is [b, s] on the model's device; with sequence parallelism s must be a
    multiple of the TP size (as in training).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    was_training = model.training
    model.eval()
    try:
        chunks = _forward_chunks(model, tokens)
        logits, _ = model.output_layer(chunks[0], weight=output_weight_of(model))
        logits = model._scale_logits(logits)
        ce = None
        if labels is not None:  # [s, b, V/tp] logits against [s, b] labels, as in GPTModel's loss
            ce = vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous()).t()
        main = vocab_parallel_argmax(logits, vocab_limit=vocab_limit, group=tp_group_of(model))
        heads = [greedy_tokens(model, c, vocab_limit=vocab_limit) for c in chunks[1:]]
        return torch.stack([main, *heads]).transpose(1, 2), ce
    finally:
        model.train(was_training)


def teacher_forced_predictions(model, tokens: Tensor, *, vocab_limit: Optional[int] = None) -> Tensor:
    """Greedy tokens of the main head and every MTP head: [1 + D, b, s] (row 0 = main, row k = head k)."""
    if getattr(model, "mtp", None) is None:
        raise ValueError("the model has no MTP heads (mtp.num_heads = 0): there is nothing to accept")
    return teacher_forced_outputs(model, tokens, vocab_limit=vocab_limit)[0]


# ------------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------------


def acceptance_counts(
    preds: Tensor, loss_mask: Optional[Tensor] = None, max_k: Optional[int] = None, select: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """(acc, base), each [K] int64, from predictions [1 + D, b, s] (row 0 = main greedy).

    `loss_mask` [b, s] is megatron's label-aligned mask (entry t is about token t+1): the check of head k at
    t counts when loss_mask[t+k] is set, i.e. when the main head's target at t+k is a real token -- the same
    rule as the training-time metric in mtpd_megatron/mtpd/hook.py. `select` [b, s] optionally restricts the
    draft positions t that are counted (e.g. the positions a decoder drafted from).
    """
    main, heads = preds[0], preds[1:]
    depth = heads.shape[0] if max_k is None else min(max_k, heads.shape[0])
    b, s = main.shape
    dev = main.device
    mask = torch.ones(b, s, dtype=torch.bool, device=dev) if loss_mask is None else loss_mask.to(torch.bool)
    origin = torch.ones(b, s, dtype=torch.bool, device=dev) if select is None else select.to(torch.bool)
    acc = torch.zeros(depth, dtype=torch.long, device=dev)
    base = torch.zeros_like(acc)
    chain_prev = torch.ones(b, s, dtype=torch.bool, device=dev)  # chain_0 = 1
    for k in range(1, depth + 1):
        if k >= s:
            break
        match = torch.zeros(b, s, dtype=torch.bool, device=dev)
        match[:, : s - k] = heads[k - 1, :, : s - k] == main[:, k:]
        valid = torch.zeros(b, s, dtype=torch.bool, device=dev)
        valid[:, : s - k] = origin[:, : s - k] & mask[:, k:]
        chain = chain_prev & match
        acc[k - 1] = (valid & chain).sum()
        base[k - 1] = (valid & chain_prev).sum()
        chain_prev = chain
    return acc, base


@dataclass
class AcceptanceStats:
    """Running counts; `metrics()` turns them into a_k, CAR_k and tau."""

    acc: list = field(default_factory=list)
    base: list = field(default_factory=list)
    positions: int = 0

    def add(self, acc: Tensor, base: Tensor, positions: int = 0) -> None:
        acc, base = acc.tolist(), base.tolist()
        if not self.acc:
            self.acc, self.base = [0] * len(acc), [0] * len(base)
        if len(acc) != len(self.acc):
            raise ValueError(f"head count changed: {len(acc)} vs {len(self.acc)}")
        self.acc = [x + y for x, y in zip(self.acc, acc)]
        self.base = [x + y for x, y in zip(self.base, base)]
        self.positions += int(positions)

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "AcceptanceStats":
        """Sum the counts over `group` (the data-parallel ranks); in place, returns self."""
        if not (dist.is_initialized() and dist.get_world_size(group) > 1):
            return self
        t = torch.tensor([self.positions, *self.acc, *self.base], dtype=torch.float64)
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=group)
        vals = [int(round(x)) for x in t.tolist()]
        n = len(self.acc)
        self.positions, self.acc, self.base = vals[0], vals[1 : 1 + n], vals[1 + n :]
        return self

    def metrics(self) -> dict:
        return acceptance_metrics(self.acc, self.base, positions=self.positions)


def acceptance_metrics(acc: Iterable[int], base: Iterable[int], positions: Optional[int] = None) -> dict:
    """a_k = acc_k/base_k, CAR_k = prod a_j, tau = 1 + sum CAR_k (a head with base 0 has a_k = 0)."""
    acc, base = [int(x) for x in acc], [int(x) for x in base]
    a = [x / y if y else 0.0 for x, y in zip(acc, base)]
    car, prod = [], 1.0
    for x in a:
        prod *= x
        car.append(prod)
    out = {"a": a, "car": car, "tau": 1.0 + sum(car), "acc_counts": acc, "base_counts": base}
    if positions is not None:
        out["positions"] = positions
    return out


@torch.no_grad()
def evaluate_model(
    model,
    batches: Iterable,
    *,
    vocab_limit: Optional[int] = None,
    max_k: Optional[int] = None,
    dp_group=None,
    reduce: bool = True,
) -> dict:
    """Main-head validation loss and perplexity, plus teacher-forced a_k / CAR_k / tau when the model has
    MTP heads, over `batches` of dicts with 'tokens' (+ 'labels', 'loss_mask') or bare token tensors [b, s].

    Acceptance without the main head's loss beside it is misleading (a weak main head is easy to predict),
    so both come from the same forward. Without 'labels' the labels are the tokens shifted by one (the last
    position is not scored). Counts and loss sums are summed over the data-parallel group (each DP rank passes
    its own share of the data); every TP rank of a group must see the same batches.
    """
    stats = AcceptanceStats()
    loss_sum, loss_tokens = 0.0, 0.0
    device = next(model.parameters()).device
    heads = num_heads(model)
    for batch in batches:
        if not isinstance(batch, dict):
            batch = {"tokens": batch}
        tokens = batch["tokens"].to(device)
        mask = batch.get("loss_mask")
        mask = None if mask is None else mask.to(device)
        labels = batch.get("labels")
        score = torch.ones(tokens.shape, device=device) if mask is None else mask.float().clone()
        if labels is None:  # the next token, where there is one: the last position is not scored
            labels = torch.roll(tokens, -1, dims=1)
            score[:, -1] = 0
        preds, ce = teacher_forced_outputs(model, tokens, vocab_limit=vocab_limit, labels=labels.to(device))
        loss_sum += float((ce.double() * score).sum())
        loss_tokens += float(score.sum())
        if heads:
            acc, base = acceptance_counts(preds, mask, max_k=max_k)
            stats.add(acc.cpu(), base.cpu(), positions=int(tokens.numel() if mask is None else mask.bool().sum()))
    if not loss_tokens:
        raise ValueError("no batches (or no scored tokens) to evaluate")
    if reduce:
        if dp_group is None and dist.is_initialized():
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                dp_group = parallel_state.get_data_parallel_group()
        if heads:
            stats.all_reduce(dp_group)
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            t = torch.tensor([loss_sum, loss_tokens], dtype=torch.float64)
            if dist.get_backend(dp_group) == "nccl":
                t = t.cuda()
            dist.all_reduce(t, group=dp_group)
            loss_sum, loss_tokens = t.tolist()
    main_loss = loss_sum / loss_tokens
    out = {"main_loss": main_loss, "main_ppl": math.exp(min(main_loss, 700.0)), "loss_tokens": int(loss_tokens)}
    if heads:
        out.update(stats.metrics())
    return out


@torch.no_grad()
def evaluate_acceptance(
    model,
    batches: Iterable,
    *,
    vocab_limit: Optional[int] = None,
    max_k: Optional[int] = None,
    dp_group=None,
    reduce: bool = True,
) -> dict:
    """Teacher-forced a_k / CAR_k / tau (and the main head's loss) over `batches`: `evaluate_model` for a
    model that must have MTP heads."""
    if num_heads(model) == 0:
        raise ValueError("the model has no MTP heads (mtp.num_heads = 0): there is nothing to accept")
    return evaluate_model(model, batches, vocab_limit=vocab_limit, max_k=max_k, dp_group=dp_group, reduce=reduce)
