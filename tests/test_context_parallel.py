"""Context parallelism (CP = 2 on gloo) against CP = 1: the MTP-D hook's teacher across ranks (plain and
packed sequences, chunks shorter than the number of heads, the seesaw ablation), the CP attention, and a
real megatron model's loss, per-head metrics and gradients — each compared with the single-sequence run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from distributed_harness import run_distributed
from test_mtpd_hook import MTPD, H, V, _fake_config, _reference_objective

from mtpd_megatron.config import config_from_dict
from mtpd_megatron.mtpd import hook

CP = 2


def _local_positions(seq: int, cp: int, rank: int, cu=None) -> torch.Tensor:
    """Global positions of rank's tokens: its chunks r and 2cp-1-r of the sequence (or of every document)."""
    bounds = cu if cu is not None else [0, seq]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        c = (end - start) // (2 * cp)
        for g in (rank, 2 * cp - 1 - rank):
            out.append(torch.arange(start + g * c, start + (g + 1) * c))
    return torch.cat(out)


def _hook_case(seq, cu, mtpd, detach, frozen=False, cp_rank=None):
    """The hook on one global sequence (cp_rank None) or on this CP rank's part: the hidden states' gradient
    (this rank's rows), the float64 reference objective's gradient at those rows, and the metric sums."""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    heads = 3
    alphas, betas = [1.0, 0.5, 0.8], [1.0, 2.0, 0.3]
    weight = torch.randn(V, H, dtype=torch.float64)
    full = torch.randn(1 + heads, seq, 1, H, dtype=torch.float64)
    labels = torch.randint(0, V, (1, seq))
    mask = (torch.rand(1, seq) > 0.25).double()
    bounds = cu if cu is not None else [0, seq]
    doc_ids = torch.repeat_interleave(
        torch.arange(len(bounds) - 1), torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    )
    params = None
    if cu is not None:
        cu_t = torch.tensor(cu, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t)
    cfg = _fake_config(heads, alphas, betas, detach_teacher=detach, **mtpd)
    if frozen:  # looped extension: head 1 frozen (no loss, acceptance still measured)
        entry = hook.attached(cfg)
        entry.settings = dataclasses.replace(entry.settings, trained=(False, True, True))
        alphas, betas = [0.0] + alphas[1:], [0.0] + betas[1:]

    def output_layer(h, weight=None, runtime_gather_output=None):
        return h @ weight_.t(), None

    weight_ = weight
    group, cp = None, 1
    idx = torch.arange(seq)
    if cp_rank is not None:
        group, cp = dist.new_group([0, 1]), CP
        idx = _local_positions(seq, cp, cp_rank, cu)
    hidden = full[:, idx].reshape((1 + heads) * len(idx), 1, H).clone().requires_grad_(True)
    out = hook.mtpd_process_mtp_loss(
        hidden,
        labels[:, idx],
        mask[:, idx],
        output_layer,
        None,
        None,
        True,
        None,
        cfg,
        cp_group=group,
        packed_seq_params=params,
    )
    (out * 0).sum().backward()
    got = hidden.grad.view(1 + heads, len(idx), H) / cp  # the hook scales by CP (DDP averages over DP x CP)
    sums = hook.attached(cfg).metrics.raw(group)

    # the reference objective on the whole sequence, by autograd
    ref_hidden = full.clone().requires_grad_(True)
    spec = dict(
        topn=mtpd.get("topn", MTPD["topn"]),
        direction=mtpd.get("direction", "forward"),
        mode=mtpd.get("mode", "renorm"),
        temperature=1.0,
        objective=mtpd.get("objective", "kl"),
        lk_lambda=mtpd.get("lk_lambda", 0.5),
    )
    ref = _reference_objective(
        [c.squeeze(1) for c in ref_hidden],
        weight,
        labels[0],
        mask[0],
        doc_ids,
        heads,
        0.3,
        alphas,
        betas,
        spec,
        detach_teacher=detach,
    )
    ref.backward()
    return got, ref_hidden.grad[:, idx].squeeze(2), sums


CASES = {
    "plain": (24, None),
    "short_chunks": (8, None),  # chunks of 2 tokens < 3 heads: the teacher is two chunks away
    "packed": (24, [0, 8, 12, 24]),  # a 4-token document: chunks of 1 token
}


VARIANTS = [
    (dict(direction="forward", mode="renorm"), True, False),
    (dict(direction="reverse", mode="tail", objective="lk", lk_lambda=0.4), False, False),
    (dict(direction="forward", mode="renorm"), True, True),
]  # a frozen head (looped extension)


def _all_hook_cases():
    """Every case on this CP rank, and the same case on the whole sequence in this process (CP = 1)."""
    import torch.distributed as dist

    out = {}
    for case, (seq, cu) in CASES.items():
        for i, (mtpd, detach, frozen) in enumerate(VARIANTS):
            _, _, single = _hook_case(seq, cu, mtpd, detach, frozen)
            out[case, i] = (*_hook_case(seq, cu, mtpd, detach, frozen, cp_rank=dist.get_rank()), single)
    return out


def _attention_case():
    """SDPAttention at CP = 2 (GQA: 4 query heads, 2 groups) on this rank's chunks vs SDPA on the whole
    sequence: outputs and the gradients of queries, keys and values (keys/values: reduce-scattered)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mtpd_megatron.model.sdpa_attention import SDPAttention
    from mtpd_megatron.parallel import context

    ps.initialize_model_parallel(context_parallel_size=CP)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        context_parallel_size=CP,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    attention = SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    torch.manual_seed(1)
    seq, b, d = 24, 2, 8
    q, k, v = (torch.randn(seq, b, n, d, dtype=torch.float64) for n in (4, 2, 2))
    w = torch.randn(seq, b, 4 * d, dtype=torch.float64)
    idx = context.global_positions(seq // CP, CP, dist.get_rank())
    local = [t[idx].clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*local, None)
    (out * w[idx]).sum().backward()

    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in full), is_causal=True, scale=attention.softmax_scale, enable_gqa=True
    )
    ref = ref.permute(2, 0, 1, 3).reshape(seq, b, 4 * d)
    (ref * w).sum().backward()
    ps.destroy_model_parallel()
    return [out.detach(), *(t.grad for t in local)], [ref.detach()[idx], *(t.grad[idx] for t in full)]


def _cp_workers():
    return _all_hook_cases(), _attention_case()


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_cp_workers, CP)  # one start of the two ranks for the hook and attention cases


def test_sdpa_attention_under_context_parallelism(cp_results):
    for rank, (_, (got, ref)) in enumerate(cp_results):
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}, rank {rank}")


def test_hook_under_context_parallelism_matches_the_whole_sequence(cp_results):
    """Hidden-state gradients (both CP ranks, the seesaw's teacher gradient crossing back to its owner) and the
    metric sums over the CP group equal those of the whole sequence in one process, in float64."""
    for rank, (hook_results, _) in enumerate(cp_results):
        for (case, variant), (got, ref, sums, single) in hook_results.items():
            where = f"{case}, variant {variant}, rank {rank}"
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=where)
            torch.testing.assert_close(sums, single, rtol=1e-9, atol=1e-9, msg=f"metrics: {where}")
            assert sums[:, 0].sum() > 0, where
            if VARIANTS[variant][1]:  # detached teacher: the main head's hidden states get nothing
                assert got[0].abs().sum() == 0, where
            else:
                assert got[0].abs().sum() > 0, where


# --------------------------------------------------------------------------------------------------------
# The trainer: a real megatron model (SDPA attention, RoPE, MTP block, DDP, DistributedOptimizer)
# --------------------------------------------------------------------------------------------------------

RESUMED_STEPS = 3


def _trainer_config(data, save, **parallel) -> dict:
    from train_helpers import tiny_config

    tok, prefix = data / "tok" / "tokenizer.json", data / "corpus_text_document"
    cfg = tiny_config(
        tok,
        prefix,
        save,
        parallel=parallel,
        training={"train_iters": 2 + RESUMED_STEPS, "micro_batch_size": 2, "global_batch_size": 4},
    )
    cfg["model"]["num_query_groups"] = 2  # GQA: 2 query heads per key/value head
    return cfg


def _run_trainer(cfg_dict: dict, resume: str, steps: int, save_after: int = 0) -> dict:
    """Build the Trainer for this layout; the first step's loss, per-head metrics and reduced gradients (by
    parameter name, this rank's TP shard), then the losses of all `steps`; save after `save_after` steps."""
    import copy

    import torch.distributed as dist
    from megatron.core import parallel_state

    from mtpd_megatron.data import load_tokenizer
    from mtpd_megatron.parallel import launch
    from mtpd_megatron.trainer import Trainer

    cfg = config_from_dict(copy.deepcopy(cfg_dict))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    launch.init_distributed(cfg, launch.read_env())
    trainer = Trainer(cfg, load_tokenizer(cfg.data.tokenizer), torch.device("cpu"), resume=resume)
    module = trainer.model[0].module
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    finalize, grads = trainer.megatron_config.finalize_model_grads_func, []

    def capture(*args, **kwargs):  # before DDP's reduction: sum over DP x CP / its size = the reduced gradient
        if not grads:
            local = {n: p.main_grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
            for g in local.values():
                dist.all_reduce(g, group=dp_cp)
                g /= dist.get_world_size(dp_cp)
            grads.append(local)
        return finalize(*args, **kwargs)

    trainer.megatron_config.finalize_model_grads_func = capture
    trainer.train_iter = _uneven_loss_mask(trainer.train_iter)
    losses, metrics = [], None
    for step in range(steps):
        losses.append(trainer.train_step().loss)
        if step == 0:
            metrics = trainer._head_metrics()
        if save_after and step + 1 == save_after:
            trainer.save()
    trainer.close()
    return {"losses": losses, "metrics": metrics, "grads": grads[0]}


def _uneven_loss_mask(batches):
    """The corpus' loss masks are all ones; mask a third of the tokens (by id) so that the CP ranks' shares
    of a sequence hold different token counts (exactness then needs the counts of the whole sequence)."""
    for batch in batches:
        yield dict(batch, loss_mask=batch["loss_mask"] * (batch["tokens"] % 3 != 0))


def _runs(plan: list) -> list:
    return [_run_trainer(*args) for args in plan]


def _assert_same_step(got: dict, ref: dict, where: str) -> None:
    assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5, abs=1e-6), where
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (where, key)
    assert set(got["grads"]) == set(ref["grads"]), where
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")


@pytest.mark.slow
def test_trainer_context_parallel_matches_cp1_and_resumes_across_cp(tmp_path):
    """CP = 2 trains like CP = 1 (first step: loss, per-head metrics, every gradient; then the losses) with
    uneven loss masks; a CP = 1 checkpoint resumes at TP = 2 x CP = 2 and a CP = 2 checkpoint at CP = 1
    (TP = 2 x DP = 2) with the same losses and, between the two, the same gradients and metrics: weights,
    AdamW moments of the DistributedOptimizer (sharded over DP x CP) and the data position resharded."""
    from train_helpers import make_data

    data = tmp_path / "data"
    make_data(data)
    steps, ckpt = 2 + RESUMED_STEPS, "iter_0000002"
    cp1, cp2 = tmp_path / "cp1", tmp_path / "cp2"
    cfg = lambda save=None, **p: _trainer_config(data, save, **p)  # noqa: E731

    ((ref,),) = run_distributed(_runs, 1, [(cfg(cp1), "none", steps, 2)])
    two = run_distributed(_runs, 2, [(cfg(cp2, context_parallel_size=2), "none", steps, 2)])
    four = run_distributed(
        _runs,
        4,
        [
            (cfg(None, tensor_model_parallel_size=2, context_parallel_size=2), str(cp1 / ckpt), RESUMED_STEPS),
            (cfg(None, tensor_model_parallel_size=2), str(cp2 / ckpt), RESUMED_STEPS),
        ],
    )

    for rank, (cp2_run,) in enumerate(two):
        _assert_same_step(cp2_run, ref, f"CP=2 rank {rank} vs CP=1")
        assert cp2_run["losses"] == pytest.approx(ref["losses"], abs=1e-5), rank
    for rank, (tp_cp, tp_dp) in enumerate(four):  # megatron's rank order: tp_rank = rank % TP in both layouts
        assert tp_cp["losses"] == pytest.approx(ref["losses"][2:], abs=1e-5), rank  # CP=1 ckpt at TP2 x CP2
        assert tp_dp["losses"] == pytest.approx(ref["losses"][2:], abs=1e-5), rank  # CP=2 ckpt at TP2 x DP2
        _assert_same_step(tp_cp, tp_dp, f"TP=2 x CP=2 rank {rank} vs TP=2")
