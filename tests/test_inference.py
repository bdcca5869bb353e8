"""Inference: teacher-forced acceptance math, vocabulary-parallel argmax, and speculative decoding that is
token-identical to greedy decoding -- on tiny megatron models built in this process (gloo world of one).

Two models: one with random (untrained) heads, where nearly every draft is rejected, and one trained for a
few dozen steps on a cyclic synthetic corpus, where most drafts are accepted, so both the reject and the
accept paths (and partial acceptance) run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from distributed_harness import free_port, run_distributed

V = 128  # vocabulary (already a multiple of 128: no padding)
HEADS = 4


def _config(num_heads=HEADS, tp=1, seed=1234):
    from mtpd_megatron.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 32,
                "ffn_hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "attention_backend": "sdpa",
                "max_position_embeddings": 256,
            },
            "mtp": {"num_heads": num_heads, "loss_scaling_factor": 1.0},
            "parallel": {"tensor_model_parallel_size": tp},
            "training": {"seed": seed},
        }
    )


def _build(num_heads=HEADS, seed=1234):
    from mtpd_megatron.model.builder import build_model
    from mtpd_megatron.parallel.launch import set_seed

    set_seed(seed)
    return build_model(_config(num_heads, seed=seed), vocab_size=V).eval()


def _cyclic(generator, b, s):
    """Sequences x[t+1] = x[t] + step (mod V) with 5% random tokens: the next tokens are predictable."""
    start = torch.randint(0, V, (b, 1), generator=generator)
    step = torch.randint(1, 4, (b, 1), generator=generator)
    x = (start + step * torch.arange(s)) % V
    noise = torch.rand(b, s, generator=generator) < 0.05
    return torch.where(noise, torch.randint(0, V, (b, s), generator=generator), x)


@pytest.fixture(scope="module")
def world():
    """gloo world of one + megatron groups at TP=1, torn down after this module."""
    from megatron.core import parallel_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP threads only spin against the other test processes
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    torch.set_num_threads(threads)
    if owned:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def random_model(world):
    return _build()


@pytest.fixture(scope="module")
def trained_model(world):
    """~70 AdamW steps on the MTP training loss (main CE + every head's CE through megatron's MTP block)."""
    model = _build(seed=7)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(70):
        x = _cyclic(g, 8, 25)
        tokens, labels = x[:, :-1], x[:, 1:]
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        loss = model(tokens, pos, None, labels=labels, loss_mask=torch.ones(labels.shape)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _naive_greedy(model, prompt, n):
    """Reference: full recompute of the whole sequence through megatron's forward for every new token."""
    x = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = torch.tensor([x])
            logits = model(t, torch.arange(len(x))[None], None)  # [1, s, V]
            x.append(int(logits[0, -1].argmax()))
    return x[len(prompt) :]


# ------------------------------------------------------------------------------------------------------
# Acceptance math
# ------------------------------------------------------------------------------------------------------


def test_acceptance_hand_example():
    """Logits built by hand -> argmax -> counts, a_k, CAR_k, tau computed on paper."""
    from mtpd_megatron.inference.acceptance import acceptance_counts, acceptance_metrics, vocab_parallel_argmax

    def onehot(ids, vocab=6):
        logits = torch.full((len(ids), 1, vocab), -1.0)  # [s, b=1, V]
        for t, i in enumerate(ids):
            logits[t, 0, i] = 2.0
        return logits

    main = [3, 1, 4, 1, 5, 2]  # m[t]
    head1 = [1, 4, 0, 5, 2, 0]  # want m[t+1]: t=0..4 -> 1,4,1,5,2 : match at t=0,1,3,4
    head2 = [4, 1, 5, 2, 0, 0]  # want m[t+2]: t=0..3 -> 4,1,5,2 : all match
    logits = [onehot(main), onehot(head1), onehot(head2)]
    logits[0][2, 0, 0] = 2.0  # a tie at t=2 between ids 0 and 4: argmax takes the lowest id (0)
    preds = torch.stack([vocab_parallel_argmax(z) for z in logits]).transpose(1, 2)  # [3, b, s]
    assert preds[0, 0].tolist() == [3, 1, 0, 1, 5, 2]
    # With the tie, m[2] = 0: head1 at t=1 (4) no longer matches, head2 at t=0 (4) does not match either.
    # head 1, valid t=0..4: matches t=0 (1==1), t=3 (5==5), t=4 (2==2)  -> acc1 = 3, base1 = 5
    # head 2, valid t=0..3: chain_1 at t=0,3 ; match_2 at t=0? m[2]=0 vs 4 no; t=3: m[5]=2 vs 2 yes
    #   -> acc2 = 1, base2 = 2
    acc, base = acceptance_counts(preds)
    assert acc.tolist() == [3, 1] and base.tolist() == [5, 2]
    m = acceptance_metrics(acc, base)
    assert m["a"] == pytest.approx([0.6, 0.5]) and m["car"] == pytest.approx([0.6, 0.3])
    assert m["tau"] == pytest.approx(1.9)
    # The label-aligned loss mask: masking loss_mask[4] removes the checks whose target is at t+k = 4,
    # i.e. head 1 at t=3 (accepted) and head 2 at t=2 (chain broken at head 1).
    mask = torch.ones(1, 6)
    mask[0, 4] = 0
    acc, base = acceptance_counts(preds, mask)
    assert acc.tolist() == [2, 1] and base.tolist() == [4, 2]
    # select: count only the drafts made at t=3
    acc, base = acceptance_counts(preds, select=torch.tensor([[0, 0, 0, 1, 0, 0]]))
    assert acc.tolist() == [1, 1] and base.tolist() == [1, 1]


def test_vocab_limit_masks_padding_rows():
    from mtpd_megatron.inference.acceptance import vocab_parallel_argmax

    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]])
    assert vocab_parallel_argmax(logits).item() == 3
    assert vocab_parallel_argmax(logits, vocab_limit=3).item() == 2


def test_two_stage_argmax_equals_torch_max_ties_included():
    """max_with_first_index on a decoding-wide vocabulary (per-chunk maxima, then the best chunk) returns what
    torch's max(dim=-1) returns, including the first index among equal maxima within a chunk, across chunk
    boundaries and in a masked (-inf) tail; under torch.compile too (the form the decoder runs)."""
    from mtpd_megatron.inference.acceptance import ARGMAX_CHUNK, max_with_first_index

    g = torch.Generator().manual_seed(0)
    vocab = 8 * ARGMAX_CHUNK
    logits = torch.randn(3, 2, vocab, generator=g).round(decimals=1)  # many exact ties
    logits[0, 0, [5, 7]] = 9.0  # a tie inside the first chunk
    logits[0, 1, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK, 3 * ARGMAX_CHUNK]] = 9.0  # a tie across chunks
    logits[1, 0, vocab // 2 :] = float("-inf")  # a masked tail
    logits[2, 1, :] = 1.0  # all equal: index 0
    values, index = logits.max(dim=-1)
    assert index[0, 0] == 5 and index[0, 1] == ARGMAX_CHUNK - 1 and index[2, 1] == 0
    for fn in (max_with_first_index, torch.compile(max_with_first_index, dynamic=False)):
        got_values, got_index = fn(logits)
        assert torch.equal(got_values, values) and torch.equal(got_index, index)
    assert max_with_first_index(logits[..., :-128])[1].tolist() == logits[..., :-128].max(-1)[1].tolist()  # one stage


def _tp2_worker(prompts, tokens):
    """At TP=2 (and then DP=2): argmax over shards with cross-shard ties, teacher-forced counts, decoding."""
    from megatron.core import parallel_state

    from mtpd_megatron.inference import evaluate_acceptance, generate, vocab_parallel_argmax
    from mtpd_megatron.model.builder import build_model
    from mtpd_megatron.parallel.launch import set_seed

    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    full = torch.tensor([[1.0, 7.0, 3.0, 7.0, 0.0, 7.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 9.0, 9.0, 1.0, 0.0]])
    shard = full[:, rank * 4 : (rank + 1) * 4]
    out = {
        "argmax": vocab_parallel_argmax(shard, group=group).tolist(),
        "argmax_limited": vocab_parallel_argmax(shard, group=group, vocab_limit=5).tolist(),
    }
    set_seed(1234)  # same full weights as the TP=1 build (CPU init draws the full tensors, then splits)
    model = build_model(_config(tp=2), vocab_size=V).eval()
    out["tf"] = evaluate_acceptance(model, [tokens])
    out["greedy"] = generate(model, prompts, 12, k=0).tokens
    out["spec"] = generate(model, prompts, 12, k=3).tokens
    parallel_state.destroy_model_parallel()
    # DP = 2: each rank evaluates half of the batch, the counts are summed.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    set_seed(1234)
    model = build_model(_config(), vocab_size=V).eval()
    out["dp"] = evaluate_acceptance(model, [tokens[rank::2]])
    return out


def test_tensor_and_data_parallel_match_single_process(random_model):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (4, 20), generator=g)
    prompts = [[5, 9, 2], [17]]
    from mtpd_megatron.inference import evaluate_acceptance, generate

    ref_tf = evaluate_acceptance(random_model, [tokens])
    ref_greedy = generate(random_model, prompts, 12, k=0).tokens
    results = run_distributed(_tp2_worker, 2, prompts, tokens)
    for r in results:
        assert r["argmax"] == [1, 4]  # ties across shards -> lowest global id
        assert r["argmax_limited"] == [1, 4]
        assert r["tf"]["acc_counts"] == ref_tf["acc_counts"] and r["tf"]["base_counts"] == ref_tf["base_counts"]
        assert r["greedy"] == ref_greedy and r["spec"] == ref_greedy
        assert r["dp"]["acc_counts"] == ref_tf["acc_counts"] and r["dp"]["base_counts"] == ref_tf["base_counts"]


def test_teacher_forced_predictions_are_megatrons(trained_model):
    """Main argmax equals megatron's forward; head k's argmax agrees with megatron's own MTP accuracy counter."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from mtpd_megatron.inference.acceptance import teacher_forced_predictions

    g = torch.Generator().manual_seed(11)
    x = _cyclic(g, 3, 21)
    tokens, labels = x[:, :-1], x[:, 1:]
    s = tokens.shape[1]
    preds = teacher_forced_predictions(trained_model, tokens)
    pos = torch.arange(s).expand_as(tokens)
    with torch.no_grad():
        logits = trained_model(tokens, pos, None)
        assert torch.equal(preds[0], logits.argmax(-1))
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        trained_model.train()  # megatron counts head accuracy vs the data labels only in training mode
        try:
            trained_model(tokens, pos, None, labels=labels, loss_mask=torch.ones(labels.shape))
        finally:
            trained_model.eval()
    correct = MTPLossLoggingHelper.tracker["correct_values"].tolist()
    for k in range(1, HEADS + 1):
        ours = (preds[k][:, : s - k] == labels[:, k:]).sum().item()
        assert ours == correct[k - 1], f"head {k}"
    MTPLossLoggingHelper.clean_metrics_in_tracker()


def test_teacher_forced_equals_training_time_metric(trained_model):
    """The MTP-D hook's training-time acceptance (mtpd/hook.py, an independent implementation of the same
    definition, label-aligned loss mask included) gives the same a_k and tau."""
    from mtpd_megatron.inference import evaluate_acceptance
    from mtpd_megatron.mtpd import hook
    from mtpd_megatron.mtpd.metrics import MTPDMetrics

    model = _build(seed=7)  # a separate model object: attaching the hook changes its loss
    model.load_state_dict(trained_model.state_dict())
    mtp_cfg = _config().mtp
    hook.attach(model.config, hook.MTPDSettings.from_config(mtp_cfg), MTPDMetrics(mtp_cfg.num_heads))
    g = torch.Generator().manual_seed(2)
    x = _cyclic(g, 4, 33)
    tokens, labels = x[:, :-1], x[:, 1:]
    mask = torch.ones(labels.shape)
    mask[1, 5:9] = 0
    with torch.no_grad():
        model(tokens, torch.arange(32).expand_as(tokens), None, labels=labels, loss_mask=mask)
    training = hook.attached(model.config).metrics.summary()
    ours = evaluate_acceptance(model, [{"tokens": tokens, "loss_mask": mask}])
    assert 0.3 < ours["car"][-1] < 1.0
    for k in range(1, HEADS + 1):
        assert ours["a"][k - 1] == pytest.approx(training[f"mtp{k}/accept"], abs=1e-12)
    assert ours["tau"] == pytest.approx(training["tau"], abs=1e-12)


# ------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------

PROMPTS_RANDOM = [[7], [3, 99, 41, 5, 18], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def test_greedy_decoder_matches_full_recompute(random_model):
    from mtpd_megatron.inference import generate

    ref = [_naive_greedy(random_model, p, 16) for p in PROMPTS_RANDOM]
    assert generate(random_model, PROMPTS_RANDOM, 16, k=0).tokens == ref  # ragged batch
    assert generate(random_model, PROMPTS_RANDOM[1:2], 16, k=0).tokens == ref[1:2]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_equals_greedy_random_heads(random_model, k):
    from mtpd_megatron.inference import generate

    greedy = generate(random_model, PROMPTS_RANDOM, 16, k=0)
    spec = generate(random_model, PROMPTS_RANDOM, 16, k=k)
    assert spec.tokens == greedy.tokens
    assert spec.tokens_per_step < 1.3  # untrained heads: almost every draft rejected
    single = generate(random_model, PROMPTS_RANDOM[2:], 16, k=k)
    assert single.tokens == greedy.tokens[2:]


def test_fp32_logits_argmax(world):
    """bf16 model, fp32_logits=True: the decoder's argmax is the one of exact (float64) logits of its hidden."""
    from mtpd_megatron.inference.decoder import SpeculativeDecoder

    model = _build(seed=3).to(torch.bfloat16)
    hidden = torch.randn(5, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact = (hidden.double() @ model.output_layer.weight.double().t()).argmax(-1)
    assert torch.equal(SpeculativeDecoder(model, k=2, fp32_logits=True)._greedy(hidden), exact)
    assert not SpeculativeDecoder(model.float(), k=2, fp32_logits=True).fp32_logits  # fp32 model: nothing to do


def _trained_prompts():
    g = torch.Generator().manual_seed(5)
    cyc = _cyclic(g, 3, 6)
    return [cyc[0, :2].tolist(), cyc[1].tolist(), cyc[2, :4].tolist(), [11, 90, 3]]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_equals_greedy_trained_heads(trained_model, k):
    from mtpd_megatron.inference import generate

    prompts = _trained_prompts()
    greedy = generate(trained_model, prompts, 30, k=0)
    assert greedy.tokens[1] == _naive_greedy(trained_model, prompts[1], 30)
    spec = generate(trained_model, prompts, 30, k=k)
    assert spec.tokens == greedy.tokens
    assert all(len(t) == 30 for t in spec.tokens)
    flat = [a for acc in spec.accepted for a in acc]
    assert max(flat) == k, "some step must accept every draft"
    assert spec.tokens_per_step > 1 + 0.5 * k  # trained heads: most drafts accepted
    assert sum(spec.steps) < sum(greedy.steps)
    for i, p in enumerate(prompts):  # batch 1 gives the same as the ragged batch
        assert generate(trained_model, [p], 30, k=k).tokens[0] == greedy.tokens[i]


def test_partial_acceptance_and_eos(trained_model):
    """Steps that accept some but not all drafts occur; eos stops and truncates every sample."""
    from mtpd_megatron.inference import generate

    prompts = _trained_prompts()
    spec = generate(trained_model, prompts, 30, k=4)
    flat = [a for acc in spec.accepted for a in acc]
    assert any(0 < a < 4 for a in flat) and any(a == 0 for a in flat) and any(a == 4 for a in flat)
    eos = spec.tokens[1][5]
    stopped = generate(trained_model, prompts, 30, k=4, eos_id=eos)
    greedy_stopped = generate(trained_model, prompts, 30, k=0, eos_id=eos)
    assert stopped.tokens == greedy_stopped.tokens
    assert stopped.tokens[1] == spec.tokens[1][: spec.tokens[1].index(eos) + 1]


def test_decode_acceptance_equals_teacher_forced(trained_model):
    """Drafts made while decoding are the teacher-forced head predictions on the decoded text.

    Teacher forcing on the model's own greedy continuation conditions on exactly the tokens decoding saw,
    so at every position the decoder drafted from, the teacher-forced accept length equals the decoder's
    (exactly, in fp32 on the CPU). Averaged over *all* positions (tau) the two differ by a sampling
    effect, not an error: decoding drafts once per step and skips the positions inside accepted runs, so
    easy stretches get fewer draft positions than in the per-position average. The test bounds that gap.
    """
    from mtpd_megatron.inference import generate
    from mtpd_megatron.inference.acceptance import acceptance_counts, acceptance_metrics, teacher_forced_predictions

    K = HEADS
    prompts = _trained_prompts()
    spec = generate(trained_model, prompts, 40, k=K)
    checked = 0
    acc_all, base_all, acc_sel, base_sel = 0, 0, 0, 0
    for i, prompt in enumerate(prompts):
        text = torch.tensor([prompt + spec.tokens[i]])
        s = text.shape[1]
        preds = teacher_forced_predictions(trained_model, text)
        # Only steps whose K checks lie inside the text (the last step may run past max_new_tokens).
        steps = [(p, a) for p, a in zip(spec.draft_positions[i], spec.accepted[i]) if p + K < s]
        main, heads = preds[0, 0], preds[1:, 0]
        for p, a in steps:
            length = 0
            while length < K and heads[length, p] == main[p + length + 1]:
                length += 1
            assert length == a, f"sample {i} position {p}: teacher-forced accepts {length}, decoding {a}"
            checked += 1
        select = torch.zeros(1, s)
        select[0, [p for p, _ in steps]] = 1
        acc, base = acceptance_counts(preds, select=select)
        acc_sel, base_sel = acc_sel + acc, base_sel + base
        acc, base = acceptance_counts(preds)
        acc_all, base_all = acc_all + acc, base_all + base
    assert checked >= 20
    decoded = [a for acc in spec.accepted for a in acc]
    tau_steps = acceptance_metrics(acc_sel, base_sel)["tau"]
    tau_all = acceptance_metrics(acc_all, base_all)["tau"]
    # At the drafted positions the teacher-forced tau is the decoder's tokens/step (up to the steps dropped
    # at the end of each sample).
    kept = [
        a
        for i in range(len(prompts))
        for p, a in zip(spec.draft_positions[i], spec.accepted[i])
        if p + K < len(prompts[i]) + len(spec.tokens[i])
    ]
    assert tau_steps == pytest.approx(1 + sum(kept) / len(kept), abs=1e-9)
    assert spec.tokens_per_step == pytest.approx(1 + sum(decoded) / len(decoded))
    # Over all positions: same model, same text, different weighting of positions -> close, not equal.
    assert abs(tau_all - spec.tokens_per_step) < 0.5, (tau_all, spec.tokens_per_step)


def test_moe_qk_norm_speculative_equals_greedy(world):
    """Routed + shared experts in every layer (MTP layers included) and QK-norm: still exactly greedy."""
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.inference import generate
    from mtpd_megatron.model.builder import build_model
    from mtpd_megatron.parallel.launch import set_seed

    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 32,
                "ffn_hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "attention_backend": "sdpa",
                "qk_layernorm": True,
                "moe": {"num_experts": 4, "router_topk": 2, "shared_expert_hidden_size": 32},
            },
            "mtp": {"num_heads": 3},
        }
    )
    set_seed(3)
    model = build_model(cfg, vocab_size=V).eval()
    prompts = [[1, 2, 3], [5], [9, 8, 7, 6, 5, 4]]
    ref = [_naive_greedy(model, p, 10) for p in prompts]
    for k in (0, 1, 3):
        assert generate(model, prompts, 10, k=k).tokens == ref, f"k={k}"


def test_errors(random_model, world):
    from mtpd_megatron.inference import SpeculativeDecoder

    with pytest.raises(ValueError, match="k=5 drafted tokens but the model has 4 MTP heads"):
        SpeculativeDecoder(random_model, k=5)
    no_heads = _build(num_heads=0)
    with pytest.raises(ValueError, match="has 0 MTP heads"):
        SpeculativeDecoder(no_heads, k=1)
    assert SpeculativeDecoder(no_heads, k=0, max_length=8).generate([[1, 2]], 3).tokens[0] == _naive_greedy(
        no_heads, [1, 2], 3
    )
    dec = SpeculativeDecoder(random_model, k=2, max_length=10)
    with pytest.raises(ValueError, match="exceeds max_length=10"):
        dec.generate([[1, 2, 3]], 8)
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate([[]], 2)


# ------------------------------------------------------------------------------------------------------
# Decode options (issue 12): every switch leaves the tokens unchanged; adaptive drafting; exact greedy
# ------------------------------------------------------------------------------------------------------

SWITCHES = [
    {"graph_scope": "phase"},
    {"sync_every": 1},
    {"host_sync_per_depth": True},
    {"fused_prologue": True},
    {"argmax_chunk": 40},
    {"verify_width": 7},
    {"fused_prologue": True, "argmax_chunk": 50, "graph_scope": "phase"},
]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_switch_gives_identical_tokens(trained_model, switch):
    """Each DecodeOptions switch on vs off: same tokens (= greedy), and the same drafts accepted."""
    from mtpd_megatron.inference import generate
    from mtpd_megatron.inference.options import DecodeOptions

    prompts = _trained_prompts()
    off = generate(trained_model, prompts, 24, k=4)
    on = generate(trained_model, prompts, 24, k=4, options=DecodeOptions(**switch))
    assert on.tokens == off.tokens == generate(trained_model, prompts, 24, k=0, options=DecodeOptions(**switch)).tokens
    assert on.accepted == off.accepted  # fp32: the fused prologue's folded weights change no draft here


def test_fused_prologue_is_megatrons_concat_embeddings(trained_model):
    from mtpd_megatron.inference.fused import FusedHeadPrologue

    layer = trained_model.mtp.layers[1]
    g = torch.Generator().manual_seed(2)
    hidden, embedded = torch.randn(3, 2, 32, generator=g), torch.randn(3, 2, 32, generator=g)
    with torch.no_grad():
        ref = layer._concat_embeddings(hidden, embedded)
        assert torch.allclose(FusedHeadPrologue(layer)(hidden, embedded), ref, atol=1e-5, rtol=1e-5)


def test_chunked_greedy_matches_argmax_and_softmax():
    from mtpd_megatron.inference.fused import chunked_greedy

    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(3, 2, 16, generator=g), torch.randn(100, 16, generator=g)
    weight[77] = weight[12]  # an exact tie across chunks: the lower index wins, as torch.argmax
    hidden[0, 0] = weight[12] * 3
    logits = hidden @ weight[:90].t()
    tokens, prob = chunked_greedy(hidden, weight, 90, 32, confidence=True)
    assert torch.equal(tokens, logits.argmax(-1)) and tokens[0, 0] == 12
    assert torch.allclose(prob, logits.softmax(-1).max(-1).values, atol=1e-6)


@pytest.mark.parametrize("threshold,skips", [(0.2, 3), (0.24, 0), (0.27, 1)])  # this model: top-1 p 0.15-0.35
def test_adaptive_draft_length_equals_greedy(trained_model, threshold, skips):
    """Drafting stops at the first head whose top-1 probability is below the threshold: still exactly greedy,
    never more accepted than proposed, and deeper heads are skipped in some steps (within max_skips)."""
    from mtpd_megatron.inference import generate
    from mtpd_megatron.inference.options import DecodeOptions

    prompts = _trained_prompts()
    greedy = generate(trained_model, prompts, 30, k=0)
    fixed = generate(trained_model, prompts, 30, k=4)
    opts = DecodeOptions(draft_threshold=threshold, max_skips=skips)
    spec = generate(trained_model, prompts, 30, k=4, options=opts)
    assert spec.tokens == greedy.tokens
    pairs = [(a, d) for acc, ds in zip(spec.accepted, spec.proposed) for a, d in zip(acc, ds)]
    assert all(0 <= a <= d <= 4 for a, d in pairs)
    assert sum(d for _, d in pairs) < sum(4 for _ in pairs)  # some drafts were not proposed
    assert 1.0 < spec.tokens_per_step <= fixed.tokens_per_step + 1e-9
    steps = max(spec.steps) + 1  # + the prefill's draft
    assert spec.depth_runs[0] == steps  # head 1 always drafts
    if skips:
        assert spec.depth_runs[-1] < steps  # the deepest head was skipped at some step
    else:
        assert spec.depth_runs == [steps] * 4  # no skips allowed: every head runs every step
    for i, p in enumerate(prompts):  # batch 1 equals the ragged batch
        assert generate(trained_model, [p], 30, k=4, options=opts).tokens[0] == greedy.tokens[i]


def test_adaptive_bench_compares_with_the_fixed_k_rows_asked_for(trained_model):
    """bench_adaptive(fixed=[K]) measures only those fixed-K rows beside the adaptive ones (a device call has
    room for few compiled verify widths); every row equals greedy."""
    from mtpd_megatron.inference.benchmark import bench_adaptive
    from mtpd_megatron.inference.options import DecodeOptions

    rows = bench_adaptive(trained_model, _trained_prompts()[:2], 3, [0.3], 8, DecodeOptions(), fixed=[3])
    assert [r["mode"] for r in rows] == ["greedy", "fixed K=3", "adaptive P=0.3 (K<=3)"]
    assert all(r["greedy_matching"] == 2 for r in rows[1:])


def test_draft_vocabulary_is_lossless_and_restricts_the_drafts(trained_model):
    """DecodeOptions.draft_vocab: the heads propose only among the first N ids of `token_ranking`. With the
    ids of the decoded text the drafts are still accepted; with N ids that never occur in it nothing can be
    accepted (so the restriction is in force); either way, fixed K, adaptive, ragged batch and eos, the tokens
    are greedy's. Bad requests are one-line errors."""
    from mtpd_megatron.inference import SpeculativeDecoder, generate
    from mtpd_megatron.inference.options import DecodeOptions

    prompts = _trained_prompts()
    greedy = generate(trained_model, prompts, 30, k=0)
    eos = greedy.tokens[1][5]
    stopped = generate(trained_model, prompts, 30, k=0, eos_id=eos)
    counts = torch.bincount(torch.tensor([t for x in prompts + greedy.tokens for t in x]), minlength=V)
    ranking = counts.argsort(descending=True, stable=True)
    seen, unseen = int((counts > 0).sum()), ranking.flip(0)  # unseen: never-occurring ids first

    def decode(size, order, threshold=None, eos_id=None):
        opts = DecodeOptions(draft_vocab=size, draft_threshold=threshold)
        dec = SpeculativeDecoder(trained_model, k=4, max_length=40, options=opts, token_ranking=order)
        return dec.generate(prompts, 30, eos_id=eos_id)

    for threshold in (None, 0.22):
        covered = decode(seen, ranking, threshold)
        assert covered.tokens == greedy.tokens and covered.tokens_per_step > 2.0, threshold
        assert decode(seen, ranking, threshold, eos_id=eos).tokens == stopped.tokens
    assert V - seen >= 8
    excluded = decode(8, unseen)
    assert excluded.tokens == greedy.tokens and excluded.tokens_per_step == 1.0
    with pytest.raises(ValueError, match="draft_vocab=8 needs token_ranking"):
        SpeculativeDecoder(trained_model, k=2, options=DecodeOptions(draft_vocab=8))
    with pytest.raises(ValueError, match=f"draft_vocab={V} >= the vocabulary"):
        SpeculativeDecoder(trained_model, k=2, options=DecodeOptions(draft_vocab=V), token_ranking=ranking)
    with pytest.raises(ValueError, match="draft_vocab"):
        DecodeOptions(draft_vocab=-1)
    assert SpeculativeDecoder(trained_model, k=0, options=DecodeOptions(draft_vocab=8))._draft_ids is None


def test_adaptive_and_exact_greedy_ragged_batch_with_eos(trained_model):
    from mtpd_megatron.inference import generate
    from mtpd_megatron.inference.options import DecodeOptions

    prompts = _trained_prompts()
    full = generate(trained_model, prompts, 30, k=0)
    eos = full.tokens[1][5]
    greedy = generate(trained_model, prompts, 30, k=0, eos_id=eos)
    assert greedy.tokens[1] == full.tokens[1][:6] and any(len(t) == 30 for t in greedy.tokens)
    for k, opts in (
        (4, DecodeOptions(draft_threshold=0.22)),
        (0, DecodeOptions(verify_width=5)),
        (2, DecodeOptions(verify_width=5, graph_scope="phase")),
    ):
        assert generate(trained_model, prompts, 30, k=k, eos_id=eos, options=opts).tokens == greedy.tokens, (k, opts)


def test_compile_traces_each_step_piece_as_one_graph(trained_model):
    """DecodeOptions.compile on CPU (inductor, fp32): each piece -- the prefill's main model, the verify's main
    model, the acceptance, each draft depth -- traces as one graph with no break (megatron's layers, our cache
    attention, the bookkeeping), compiled once (a second decoder, also one replaying per phase, compiles
    nothing); the tokens equal the eager greedy tokens (the generated kernels' numerics). An exact greedy
    decoder (k=0 at the verify's width) compiles only its own acceptance: its verify is the very graph of the
    speculative verify, which is what keeps bf16 speculative output equal to it."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from mtpd_megatron.inference import SpeculativeDecoder
    from mtpd_megatron.inference.options import DecodeOptions

    prompts = [PROMPTS_RANDOM[1], PROMPTS_RANDOM[2][:4]]  # batch 2, ragged prompts (prefill padded to a bucket)
    ref = SpeculativeDecoder(trained_model, k=0, max_length=40).generate(prompts, 12)
    torch._dynamo.reset()
    counters.clear()
    options = DecodeOptions(compile=True)
    decoder = SpeculativeDecoder(trained_model, k=2, max_length=40, options=options)
    out, codes = run_and_get_code(decoder.generate, prompts, 12)
    assert out.tokens == ref.tokens
    assert out.tokens_per_step > 1.0  # the heads' drafts were accepted through the compiled pieces
    # The cache and hidden-state writes are in place (kv_cache.write_at_positions): no compiled piece allocates
    # a buffer of a KV cache's or a hidden buffer's size. (The acceptance still clones the small token buffer
    # around its cumprod: [b, T] ids, one fused kernel.)
    for buf in (decoder.main_caches[0].k, decoder.mtp_caches[1].v, decoder.hid[0], decoder.hid[1]):
        assert not any(f"empty_strided_cpu({tuple(buf.shape)}" in code for code in codes), tuple(buf.shape)
    graphs = counters["stats"]["unique_graphs"]
    # prefill_main and prefill_depth 1, 2 at the prompt width; verify_main, accept, depth 1 and 2 at their windows
    assert graphs == 7, dict(counters["stats"])
    for again in (options, options.with_(graph_scope="phase")):
        out = SpeculativeDecoder(trained_model, k=2, max_length=40, options=again).generate(prompts, 12)
        assert out.tokens == ref.tokens and counters["stats"]["unique_graphs"] == graphs, again
    exact = SpeculativeDecoder(trained_model, k=0, max_length=40, options=options.with_(verify_width=3))
    assert exact.generate(prompts, 12).tokens == ref.tokens
    assert counters["stats"]["unique_graphs"] == graphs + 1  # its acceptance (k=0); the rest is shared
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_autotune_mode_leaves_the_prefill_in_the_default_mode(trained_model, monkeypatch):
    """compile_mode applies to the decoding step's pieces; the prefill's (once per request, 64-token buckets
    whose autotuning outlasted a device call) compile in the default mode. torch.compile is stubbed to record the
    mode of every piece a real generate asks for, and return the piece uncompiled."""
    from mtpd_megatron.inference import SpeculativeDecoder
    from mtpd_megatron.inference.options import DecodeOptions

    modes = set()

    def record(fn, dynamic, mode):
        modes.add((fn.__name__, mode))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    options = DecodeOptions(compile=True, compile_mode="max-autotune-no-cudagraphs")
    SpeculativeDecoder(trained_model, k=2, max_length=40, options=options).generate([PROMPTS_RANDOM[1]], 6)
    autotune = "max-autotune-no-cudagraphs"
    assert modes == {
        ("_prefill_main", "default"),
        ("_draft_depth", "default"),  # the heads over the prompt
        ("_verify_main", autotune),
        ("_accept", autotune),
        ("_draft_depth", autotune),  # the heads in each step
    }


def test_position_writes_stay_in_place_under_compile():
    """Why kv_cache.write_at_positions is an index_put_: compiled, a scatter_ into a buffer clones the whole
    buffer (and copies it back), an index_put_ writes in place; both give the same values."""
    from torch._inductor.utils import run_and_get_code

    from mtpd_megatron.inference.kv_cache import write_at_positions

    b, g, T, d, s = 2, 2, 64, 8, 3
    key, q = torch.randn(s, b, g, d), torch.randn(b, g, s, d)
    positions, rows = torch.tensor([[5, 6, 7], [9, 10, 11]]), torch.arange(b).unsqueeze(1)

    def scatter(cache):
        cache.scatter_(2, positions.view(b, 1, s, 1).expand(b, g, s, d), key.permute(1, 2, 0, 3))
        return q @ cache.transpose(2, 3)

    def index_put(cache):
        write_at_positions(cache, rows, positions, key.transpose(0, 1), dim=2)
        return q @ cache.transpose(2, 3)

    results = {}
    for fn in (scatter, index_put):
        torch._dynamo.reset()
        cache = torch.zeros(b, g, T, d)
        out, codes = run_and_get_code(torch.compile(fn, dynamic=False), cache)
        results[fn.__name__] = (cache, out, any(f"empty_strided_cpu({(b, g, T, d)}" in c for c in codes))
    torch._dynamo.reset()
    (c1, o1, cloned1), (c2, o2, cloned2) = results["scatter"], results["index_put"]
    assert torch.equal(c1, c2) and torch.equal(o1, o2)
    assert cloned1 and not cloned2


def test_compile_tp_group_lookup_equals_megatrons(world):
    """The warning-free stand-in used while compiled (decoder._tp_group_or_default) resolves the same groups."""
    import warnings

    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    from mtpd_megatron.inference.decoder import _tp_group_or_default

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for args in ((None,), (None, True), ("given",)):
            assert _tp_group_or_default(*args) is get_tensor_model_parallel_group_if_none(*args), args


def test_explicit_attention_equals_sdpa_with_gqa_and_mask():
    """The written-out attention of compiled decoding (kv_cache._explicit_attention) against torch's SDPA with
    enable_gqa and a per-sample position mask (fp64): same GQA head-to-group map, same masking."""
    import torch.nn.functional as F

    from mtpd_megatron.inference.kv_cache import _explicit_attention

    g = torch.Generator().manual_seed(0)
    b, heads, groups, s, T, d = 2, 6, 2, 3, 11, 8
    q = torch.randn(b, heads, s, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, groups, T, d, generator=g, dtype=torch.float64) for _ in range(2))
    positions = torch.tensor([[2, 3, 4], [7, 8, 9]])
    mask = torch.arange(T).view(1, 1, 1, T) <= positions.view(b, 1, s, 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_explicit_attention(q, k, v, mask, 0.3), ref, rtol=1e-12, atol=1e-12)


def test_decode_options_refuse_bad_values_and_cuda_only_switches_on_cpu(random_model):
    from mtpd_megatron.inference import SpeculativeDecoder
    from mtpd_megatron.inference.options import DecodeOptions

    for bad, phrase in (
        ({"graph_scope": "layer"}, "graph_scope"),
        ({"sync_every": 0}, "sync_every"),
        ({"draft_threshold": 1.5}, "draft_threshold"),
        ({"argmax_chunk": -1}, "argmax_chunk"),
        ({"verify_width": 0}, "verify_width"),
        ({"compile_mode": "reduce-overhead"}, "compile_mode"),
        ({"max_skips": -1}, "max_skips"),
    ):
        with pytest.raises(ValueError, match=phrase):
            DecodeOptions(**bad)
    with pytest.raises(ValueError, match="verify_width=3 < k\\+1=5"):
        SpeculativeDecoder(random_model, k=4, options=DecodeOptions(verify_width=3))
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        SpeculativeDecoder(random_model, k=2, options=DecodeOptions(cuda_graphs=True))


def test_speculative_demo(trained_model):
    from mtpd_megatron.inference import speculative_demo

    class ByteTokenizer:  # ids are characters' code points modulo V
        vocab_size = V

        def tokenize(self, text):
            return [ord(c) % V for c in text]

        def detokenize(self, ids):
            return "".join(chr(i) for i in ids)

    out = speculative_demo(trained_model, ByteTokenizer(), "ABC", k=3, max_new_tokens=20)
    assert out["identical_to_greedy"] and out["new_tokens"] == 20 and len(out["text"]) == 20
    assert out["tokens_per_step"] >= 1.0 and len(out["per_position_acceptance"]) == 3
    from mtpd_megatron.inference.options import DecodeOptions

    adaptive = speculative_demo(
        trained_model, ByteTokenizer(), "ABC", k=3, max_new_tokens=20, options=DecodeOptions(draft_threshold=0.22)
    )
    assert adaptive["identical_to_greedy"] and adaptive["text"] == out["text"]


# ------------------------------------------------------------------------------------------------------
# Command-line tools on a checkpoint in the trainer's format
# ------------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_tool(script, *args):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli_checkpoint(world, tmp_path_factory):
    """A text corpus, its BPE tokenizer and indexed dataset, and a (randomly initialised) model saved the way
    the checkpoint manager saves it."""
    import json
    import random

    from megatron.core import dist_checkpointing

    from mtpd_megatron.checkpoint import layout
    from mtpd_megatron.checkpoint.manager import sharded_metadata
    from mtpd_megatron.config.load import config_to_dict
    from mtpd_megatron.data.indexed import preprocess
    from mtpd_megatron.data.tokenizer import load_tokenizer, train_tokenizer
    from mtpd_megatron.inference.loading import LoadedModel
    from mtpd_megatron.model.builder import build_model, padded_vocab_size
    from mtpd_megatron.parallel.launch import set_seed

    root = tmp_path_factory.mktemp("inference_cli")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghik") for _ in range(rng.randint(2, 5))) for _ in range(60)]
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    tok_path = train_tokenizer([corpus], root / "tok", vocab_size=300, min_frequency=1)
    prefix = root / "corpus_text_document"
    preprocess([corpus], tok_path, prefix, append_eod=True, progress=False)
    tok = load_tokenizer(tok_path)
    cfg = _config()
    cfg.data.tokenizer, cfg.data.paths, cfg.data.split, cfg.data.seq_length = (
        str(tok_path),
        [str(prefix)],
        "70,30,0",
        32,
    )
    padded = padded_vocab_size(tok.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    set_seed(21)
    model = build_model(cfg, vocab_size=padded).eval()
    # The model part of what CheckpointManager.save writes, published the same way (layout.py).
    meta = {"iteration": 3, "vocab_size": tok.vocab_size, "padded_vocab_size": padded, "config": config_to_dict(cfg)}
    tmp = layout.prepare_tmp(root / "ckpt", 3)
    dist_checkpointing.save({"model": model.sharded_state_dict(metadata=sharded_metadata())}, str(tmp))
    path = layout.publish(root / "ckpt", 3, meta, keep_last=0)
    loaded = LoadedModel(model, cfg, meta, path, tok.vocab_size, padded, torch.device("cpu"))
    return root, corpus, loaded, tok


def test_eval_acceptance_cli(cli_checkpoint):
    import json

    from mtpd_megatron.inference import evaluate_acceptance
    from mtpd_megatron.inference.loading import split_samples

    root, _, loaded, tok = cli_checkpoint
    out, png = root / "acc.json", root / "acc.png"
    proc = _run_tool(
        "eval_acceptance.py",
        "--ckpt",
        root / "ckpt",
        "--ckpt",
        loaded.path,
        "--label",
        "A",
        "--label",
        "B",
        "--split",
        "valid",
        "--num-samples",
        6,
        "--batch-size",
        4,
        "--out",
        out,
        "--plot",
        png,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    a, b = result["checkpoints"]
    assert (a["label"], b["label"]) == ("A", "B") and a["acc_counts"] == b["acc_counts"]
    assert a["positions"] == 6 * 32 and result["data"]["sequences"] == 6 and len(a["car"]) == HEADS
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = split_samples(loaded, tok, "valid", 6, 32)
    batch = {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
    }
    ref = evaluate_acceptance(loaded.model, [batch], vocab_limit=loaded.vocab_size)
    assert a["acc_counts"] == ref["acc_counts"] and a["base_counts"] == ref["base_counts"]
    assert a["tau"] == pytest.approx(ref["tau"])
    # vLLM's names for the same counts (extra keys; the originals are unchanged)
    assert a["mean_acceptance_length"] == a["tau"] and a["per_position_acceptance_rate"] == a["car"]
    assert a["draft_acceptance_rate"] == pytest.approx(sum(a["car"]) / HEADS)
    # The main-head loss is megatron's own per-token loss (GPTModel.forward with labels) over the same tokens.
    labels = torch.stack([s["labels"] for s in samples])
    tokens = batch["tokens"]
    with torch.no_grad():
        per_token = loaded.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=labels)
    mask = batch["loss_mask"]
    assert a["main_loss"] == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-5)
    assert a["main_ppl"] == pytest.approx(math.exp(a["main_loss"])) and result["warning"] is None
    assert "main_loss=" in proc.stdout and "tau=" in proc.stdout


def test_loss_gap_warning():
    from mtpd_megatron.inference.evaluation import loss_gap_warning

    same = [{"label": "MTP", "main_loss": 3.90}, {"label": "MTP-D", "main_loss": 3.93}]
    assert loss_gap_warning(same) is None
    worse = [{"label": "MTP", "main_loss": 3.90}, {"label": "MTP-D", "main_loss": 4.66}]
    line = loss_gap_warning(worse)
    assert line.startswith("warning: main-head losses differ by 19.5%") and "\n" not in line


def test_bench_decode_cli_and_errors(cli_checkpoint):
    import json

    root, corpus, loaded, _ = cli_checkpoint
    out = root / "bench.json"
    proc = _run_tool(
        "bench_decode.py",
        "--ckpt",
        loaded.path,
        "--jsonl",
        corpus,
        "--num-prompts",
        2,
        "--prompt-len",
        8,
        "--new-tokens",
        10,
        "--k",
        1,
        3,
        "--repeats",
        1,
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["greedy"]["new_tokens"] == 20 and result["prompts"] == 2
    assert [r["k"] for r in result["speculative"]] == [1, 3]
    assert all(r["identical_to_greedy"] for r in result["speculative"])
    assert all(r["first_difference"] == [None, None] for r in result["speculative"])
    cost = _run_tool(
        "bench_decode.py",
        "--config",
        os.path.join(ROOT, "configs", "tiny_dense.yaml"),
        "--vocab-size",
        128,
        "--device",
        "cpu",
        "--num-prompts",
        1,
        "--prompt-len",
        4,
        "--new-tokens",
        4,
        "--k",
        2,
        "--repeats",
        1,
        "--out",
        root / "cost.json",
    )
    assert cost.returncode == 0, cost.stderr[-3000:]
    assert json.loads((root / "cost.json").read_text())["source"]["random_weights"].endswith("tiny_dense.yaml")
    missing = _run_tool("eval_acceptance.py", "--ckpt", root / "nope", "--out", root / "x.json")
    assert missing.returncode == 2 and not (root / "x.json").exists()
    lines = [line for line in missing.stderr.splitlines() if line.startswith("eval_acceptance: error:")]
    assert len(lines) == 1 and "nope" in lines[0], missing.stderr[-2000:]
    too_many = _run_tool(
        "bench_decode.py", "--ckpt", loaded.path, "--jsonl", corpus, "--k", 5, "--out", root / "y.json"
    )
    assert too_many.returncode == 2 and "the model has 4 MTP heads" in too_many.stderr


def test_bench_decode_issue12_rows(cli_checkpoint):
    """Profile, switch ablation, fixed vs adaptive K, exact greedy and batches in one CPU run: every row's
    tokens equal greedy's (fp32), and the main-head loss is reported with the figures."""
    import json

    root, corpus, loaded, _ = cli_checkpoint
    out, md, prof = root / "bench12.json", root / "bench12.md", root / "prof"
    proc = _run_tool(
        "bench_decode.py",
        "--ckpt",
        loaded.path,
        "--jsonl",
        corpus,
        "--num-prompts",
        2,
        "--prompt-len",
        8,
        "--new-tokens",
        8,
        "--k",
        2,
        "--main-k",
        2,
        "--repeats",
        1,
        "--loss-samples",
        4,
        "--profile",
        prof,
        "--ablate",
        "graph_per_phase",
        "fused_prologue",
        "argmax_chunk",
        "--draft-threshold",
        0.3,
        "--exact-greedy",
        "--draft-vocab",
        50,
        "--batch",
        1,
        2,
        "--out",
        out,
        "--markdown",
        md,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["main_loss"] > 0 and "computed on 4 valid sequences" in r["main_loss_source"]
    assert r["cuda_graphs"] is False and r["options"]["cuda_graphs"] is False  # --cuda-graphs (default): no-op on CPU
    assert r["complete"] is True
    assert r["greedy"]["warmup_seconds"] > 0 and all(s["warmup_seconds"] > 0 for s in r["speculative"])
    assert [p["label"] for p in r["profile"]] == ["greedy", "k2"]
    assert r["profile"][1]["by_region_ms"]["draft.depth2"] > 0 and r["profile"][0]["kernels_per_step"] > 0
    assert "aten::" in (prof / "k2_kernels.txt").read_text() and (prof / "summary.md").is_file()
    assert [a["switch"] for a in r["ablation"]] == ["baseline", "graph_per_phase", "fused_prologue", "argmax_chunk"]
    assert all(a["greedy_matching_baseline_greedy"] == a["k2_matching_baseline_greedy"] == 2 for a in r["ablation"])
    assert [a["mode"] for a in r["adaptive"]] == ["greedy", "fixed K=1", "fixed K=2", "adaptive P=0.3 (K<=2)"]
    assert all(a["greedy_matching"] == 2 for a in r["adaptive"][1:])
    e = r["exact"]
    assert e["speculative_mismatches_vs_fast_greedy"] == e["speculative_mismatches_vs_exact_greedy"] == 0
    assert [a["mode"] for a in r["draft_vocab"]] == ["greedy", "K=2, draft vocab all", "K=2, draft vocab 50"]
    assert all(a["greedy_matching"] == 2 for a in r["draft_vocab"][1:]), r["draft_vocab"]
    assert r["draft_ranking_source"].startswith("token counts of ")
    assert [b["batch"] for b in r["batches"]] == [1, 2]
    assert all(b["speculative"]["greedy_same_batch_matching"] == b["samples"] for b in r["batches"])
    assert all(b["speculative"]["greedy_batch1_matching"] == b["samples"] for b in r["batches"])
    text = md.read_text()
    assert "Switch ablation" in text and "Exact greedy" in text and f"{r['main_loss']:.4f}" in text
    assert "frequency-ranked draft vocabulary" in text


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--k", "0"], "--k 0: every K must be >= 1"),
        (["--draft-threshold", "1.5"], "--draft-threshold 1.5: each must be a probability in (0, 1)"),
        (["--draft-vocab", "0"], "--draft-vocab 0: each N must be >= 1"),
        (["--draft-threshold", "0.3", "--adaptive-fixed", "9"], "--adaptive-fixed 9: each K must be in 1.."),
        (["--draft-vocab", "300"], "--draft-vocab 300: each N must be below the model's 300 token ids"),
        (["--compile", "--device", "cpu"], "--compile needs a CUDA device"),
        (["--ablate", "warp_drive"], "--ablate warp_drive: unknown switch"),
        (["--empty-jsonl"], "every prompt needs at least one token"),
        (["--prompt-len", "300"], "exceed the model's context of 256 tokens"),
    ],
)
def test_bench_decode_refuses_bad_requests_in_one_line(cli_checkpoint, args, phrase):
    import json

    root, corpus, loaded, _ = cli_checkpoint
    if args == ["--empty-jsonl"]:
        empty = root / "empty.jsonl"
        empty.write_text('{"text": ""}\n{"text": ""}\n')
        corpus, args = empty, []
    if args[:1] == ["--prompt-len"]:  # one long text so that the prompt really has 300 tokens
        long = root / "long.jsonl"
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        long.write_text(json.dumps({"text": " ".join(texts)}) + "\n")
        corpus = long
    out = root / "refused.json"
    proc = _run_tool(
        "bench_decode.py", "--ckpt", loaded.path, "--jsonl", corpus, "--new-tokens", 4, "--k", 1, *args, "--out", out
    )
    assert proc.returncode == 2 and not out.exists(), proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench_decode: error: ") and phrase in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--k", "0"], "--k 0: draft at least one token"),
        (["--k", "9"], "k=9 drafted tokens but the model has 4 MTP heads"),
        (["--prompt", " "], "--prompt is empty"),
        (["--prompt", "word " * 200], "exceed the model's context"),
        (["--device", "cuda"], "--device cuda: no GPU is visible"),
        (["--draft-threshold", "0"], "--draft-threshold 0.0: must be a probability in (0, 1)"),
    ],
)
def test_speculative_decode_refuses_bad_requests_in_one_line(cli_checkpoint, args, phrase):
    root, _, loaded, _ = cli_checkpoint
    base = {"--prompt": "some words", "--k": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    proc = _run_tool("speculative_decode.py", "--ckpt", loaded.path, *flat, "--new-tokens", 4)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("speculative_decode: error: ") and phrase in lines[0], proc.stderr


def test_gemv_bench_measures_the_models_weight_shapes(random_model, monkeypatch):
    """tools/bench_gemv.py times the products of a decoding step from a config alone: its shapes must be the
    weights megatron builds for that config (GQA qkv, SwiGLU fc1, padded vocabulary, the heads' eh_proj)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "tools"))
    from bench_gemv import weight_shapes

    layer = random_model.decoder.layers[0]
    real = {
        "linear_qkv": layer.self_attention.linear_qkv.weight,
        "linear_proj": layer.self_attention.linear_proj.weight,
        "linear_fc1": layer.mlp.linear_fc1.weight,
        "linear_fc2": layer.mlp.linear_fc2.weight,
        "output_layer": random_model.output_layer.weight,
        "mtp_eh_proj": random_model.mtp.layers[0].eh_proj.weight,
        "output_layer_draft64": torch.empty(64, random_model.config.hidden_size),
    }
    shapes = weight_shapes(_config().model, vocab=V - 5, draft_vocab=[64])  # V - 5 pads back to V
    assert shapes == {name: tuple(w.shape) for name, w in real.items()}
