"""MTP-D inside megatron-core: alignment (head k at t vs main at t+k), masking, packed sequences, detached
teacher, megatron's loss scaling, and TP / SP invariance — against plain reference objectives."""

from types import SimpleNamespace

import pytest
import torch
from distributed_harness import run_distributed

from mtpd_megatron.config import config_from_dict
from mtpd_megatron.mtpd import hook
from mtpd_megatron.mtpd.metrics import MTPDMetrics
from mtpd_megatron.mtpd.reference import reference_head_loss

V, H = 40, 6
MTPD = dict(topn=9, direction="forward", mode="renorm", temperature=1.0)


def _fake_config(num_heads, alphas=None, betas=None, scaling=0.3, **mtpd):
    spec = {**MTPD, **mtpd}
    mtp = config_from_dict(
        {"mtp": {"num_heads": num_heads, "mtpd": {"alpha": alphas or 1.0, "beta": betas or 1.0, **spec}}}
    ).mtp
    cfg = _FakeConfig(
        mtp_num_layers=num_heads,
        mtp_loss_scaling_factor=scaling,
        mtp_detach_heads=False,
        calculate_per_token_loss=False,
    )
    _attach(cfg, mtp)
    return cfg


class _FakeConfig(SimpleNamespace):
    """The TransformerConfig fields the loss reads (a subclass: the hook keeps a weak reference to it)."""


def _attach(config, mtp_cfg, mtp_block=None) -> hook.Attached:
    """As the trainer does: build the settings and metrics, hand them to the hook."""
    return hook.attach(
        config, hook.MTPDSettings.from_config(mtp_cfg), MTPDMetrics(mtp_cfg.num_heads), mtp_block=mtp_block
    )


def _reference_objective(
    chunks, weight, labels, mask, doc_ids, num_heads, scaling, alphas, betas, spec, detach_teacher=True
):
    """Sum over heads of scale * sum_t mask_k[t] * loss(head_k[t], main[t+k], labels[t+k]) / num_tokens_k."""
    seq = labels.shape[-1]
    teacher = chunks[0] @ weight.t()
    if detach_teacher:
        teacher = teacher.detach()
    total = 0.0
    for k in range(1, num_heads + 1):
        student = chunks[k] @ weight.t()
        t = torch.arange(seq - k)
        same_doc = doc_ids[t] == doc_ids[t + k]
        mask_k = mask[t + k] * same_doc
        loss, _, _ = reference_head_loss(
            student[t],
            teacher[t + k],
            labels[t + k],
            alpha=alphas[k - 1],
            beta=betas[k - 1],
            detach_teacher=detach_teacher,
            **spec,
        )
        total = total + scaling / num_heads * (loss * mask_k).sum() / mask_k.sum().clamp(min=1)
    return total


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "direction,mode,objective,detach",
    [
        ("forward", "renorm", "kl", True),
        ("reverse", "tail", "kl", True),
        ("forward", "renorm", "kl", False),
        ("forward", "tail", "lk", True),
        ("reverse", "renorm", "lk", False),
    ],
)
def test_hook_matches_reference_objective(packed, direction, mode, objective, detach):
    """Hidden-state gradients of the hook == the plain objective's; `detach_teacher=False` (the seesaw
    ablation) must put the KL's gradient on the main head's hidden states, the default none."""
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    seq, heads = 23, 3
    alphas, betas = [1.0, 0.5, 0.8], [1.0, 2.0, 0.3]
    weight = torch.randn(V, H, dtype=torch.float64)
    hidden = torch.randn((1 + heads) * seq, 1, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (1, seq))
    mask = (torch.rand(1, seq) > 0.25).double()
    cu = torch.tensor([0, 9, 15, seq], dtype=torch.int32) if packed else torch.tensor([0, seq], dtype=torch.int32)
    doc_ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu) if packed else None
    cfg = _fake_config(
        heads, alphas, betas, direction=direction, mode=mode, objective=objective, lk_lambda=0.4, detach_teacher=detach
    )

    def output_layer(h, weight=None, runtime_gather_output=None):
        return h @ weight_.t(), None

    weight_ = weight
    out = hook.mtpd_process_mtp_loss(
        hidden, labels, mask, output_layer, None, None, True, None, cfg, packed_seq_params=params
    )
    (out * 0).sum().backward()  # only the attached MTP-D losses send gradient (scale 1, as megatron's default)
    got = hidden.grad.clone()

    hidden.grad = None
    chunks = [c.squeeze(1) for c in torch.chunk(hidden, 1 + heads, dim=0)]
    spec = dict(topn=MTPD["topn"], direction=direction, mode=mode, temperature=1.0, objective=objective, lk_lambda=0.4)
    ref = _reference_objective(
        chunks, weight, labels[0], mask[0], doc_ids, heads, 0.3, alphas, betas, spec, detach_teacher=detach
    )
    ref.backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-9, atol=1e-12)
    if detach:
        assert got[:seq].abs().sum() == 0, "the main head's hidden states (the teacher) must get no gradient"
    else:
        assert got[:seq].abs().sum() > 0, "without the stop-gradient the teacher's hidden states get the KL's gradient"


def test_metrics_hand_made_example():
    """Acceptance on a hand-built example: main argmax sequence and head drafts chosen by construction."""
    heads = 2  # on a 6-token sequence
    main_tok = [3, 1, 4, 1, 5, 2]  # argmax of the main head at each position
    # head1 at t should match main[t+1]; head2 at t should match main[t+2]
    head1 = [1, 4, 0, 5, 2, 0]  # t=0..4 valid: matches at t=0,1,3,4 (t=2 wrong)
    head2 = [4, 0, 5, 2, 0, 0]  # t=0..3 valid: matches at t=0,2,3 (t=1 wrong)
    vocab = 8

    def onehot(ids):
        return torch.nn.functional.one_hot(torch.tensor(ids), vocab).double() * 5.0

    hidden = torch.cat([onehot(main_tok), onehot(head1), onehot(head2)]).unsqueeze(1)
    cfg = _fake_config(heads, topn=0)
    labels = torch.tensor([main_tok])
    eye = torch.eye(vocab, dtype=torch.float64)
    with torch.no_grad():
        hook.mtpd_process_mtp_loss(
            hidden,
            labels,
            None,
            lambda h, weight=None, runtime_gather_output=None: (h @ eye, None),
            None,
            None,
            False,
            None,
            cfg,
        )
    summary = hook.attached(cfg).metrics.summary()
    # head 1: 4 of 5 accepted. head 2 given head 1 accepted at t in {0,1} (t<4 valid, chain at 0,1,3):
    # positions valid for head 2 are t=0..3; chain1 there = {0,1,3}; head2 matches at {0,2,3} -> both at {0,3}.
    assert summary["mtp1/accept"] == pytest.approx(4 / 5)
    assert summary["mtp2/accept"] == pytest.approx(2 / 3)
    assert summary["mtp2/car"] == pytest.approx(4 / 5 * 2 / 3)
    assert summary["tau"] == pytest.approx(1 + 4 / 5 + 8 / 15)
    # label accuracy is against the data labels rolled by k: labels here are main_tok, so head1 at t vs
    # main_tok[t+1] is the same comparison as acceptance.
    assert summary["mtp1/label_acc"] == pytest.approx(4 / 5)
    assert summary["mtp1/topn_mass"] == pytest.approx(1.0)


def _model_metrics(tp: int, sp: bool, moe: bool, ep: int = 1, dispatcher: str = "alltoall"):
    """Build the tiny model at (tp, sp, ep), run one forward/backward, return main loss and MTP-D metrics."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.model.builder import build_model

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1 if moe else None
    )
    model_parallel_cuda_manual_seed(7)
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 32,
                "ffn_hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "moe": {
                    "num_experts": 4 if moe else 0,
                    "aux_loss_coeff": 0.0,
                    "router_topk": 2,
                    "token_dispatcher": dispatcher,
                },
            },
            "parallel": {
                "tensor_model_parallel_size": tp,
                "sequence_parallel": sp,
                "expert_model_parallel_size": ep,
                "expert_tensor_parallel_size": 1 if moe else None,
            },
            "mtp": {"num_heads": 3, "mtpd": {"topn": 20, "beta": 1.0}},
        }
    )
    model = build_model(cfg, vocab_size=128)
    _attach(model.config, cfg.mtp)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, 1)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    loss = model(tokens, pos, None, labels=labels, loss_mask=mask)
    ((loss * mask).sum() / mask.sum()).backward()
    grad_norm = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return ((loss * mask).sum().item(), hook.attached(model.config).metrics.summary(), grad_norm)


@pytest.mark.parametrize("moe", [False, True])
def test_tp_and_sequence_parallel_give_the_same_loss(moe):
    ref_loss, ref_metrics, _ = run_distributed(_model_metrics, 1, 1, False, moe)[0]
    for tp, sp in [(2, False), (2, True)] if not moe else [(2, True)]:
        for loss, metrics, _ in run_distributed(_model_metrics, 2, tp, sp, moe):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            for key, value in ref_metrics.items():
                assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, tp, sp)


def test_moe_token_dispatchers_agree_under_expert_parallelism():
    """EP = 2 on the CPU layer with both of megatron's dispatchers: the same loss and metrics."""
    results = {d: run_distributed(_model_metrics, 2, 1, False, True, 2, d) for d in ("alltoall", "allgather")}
    for (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) in zip(results["alltoall"], results["allgather"]):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert grad_a == pytest.approx(grad_b, rel=1e-4)
        for key, value in metrics_a.items():
            assert metrics_b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _trunk_and_head_grads(beta: float, kl_to_trunk: bool, detach_heads: bool = False):
    """One forward/backward of a tiny real megatron model: gradients of the trunk (decoder, embedding,
    output layer) and of the MTP heads' own parameters, by name."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.model.builder import build_model

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4},
            "mtp": {
                "num_heads": 2,
                "loss_scaling_factor": 1.0,
                "detach_heads": detach_heads,
                "mtpd": {"topn": 20, "beta": beta, "kl_to_trunk": kl_to_trunk},
            },
        }
    )
    model = build_model(cfg, vocab_size=128)
    _attach(model.config, cfg.mtp, mtp_block=model.mtp)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, 1)
    mask = torch.ones(2, 16)
    loss = model(tokens, torch.arange(16).unsqueeze(0).expand(2, 16), None, labels=labels, loss_mask=mask)
    loss.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trunk = {n: v for n, v in grads.items() if not n.startswith("mtp.")}
    heads = {n: v for n, v in grads.items() if n.startswith("mtp.")}
    return trunk, heads, hook.attached(model.config).metrics.summary()


def test_trunk_guard_keeps_the_kl_out_of_the_trunk():
    """kl_to_trunk=false: the trunk's gradient equals CE-only MTP's (beta = 0), the heads' equals MTP-D's."""
    ((guard_trunk, guard_heads, guard_m),) = run_distributed(_trunk_and_head_grads, 1, 1.0, False)
    ((ce_trunk, _, _),) = run_distributed(_trunk_and_head_grads, 1, 0.0, True)
    ((mtpd_trunk, mtpd_heads, mtpd_m),) = run_distributed(_trunk_and_head_grads, 1, 1.0, True)
    assert set(guard_trunk) == set(ce_trunk) and set(guard_heads) == set(mtpd_heads)
    for name, grad in guard_trunk.items():
        torch.testing.assert_close(grad, ce_trunk[name], rtol=1e-5, atol=1e-7, msg=name)
    for name, grad in guard_heads.items():
        torch.testing.assert_close(grad, mtpd_heads[name], rtol=1e-5, atol=1e-7, msg=name)
    # ...and the KL does move the trunk when it is allowed to (so the comparison above can fail)
    assert any((mtpd_trunk[n] - ce_trunk[n]).abs().max() > 1e-6 for n in ce_trunk)
    for key in ("mtp1/kl", "mtp2/kl", "mtp1/ce", "tau"):
        assert guard_m[key] == pytest.approx(mtpd_m[key], rel=1e-5)


def test_detach_heads_sends_no_mtp_gradient_to_the_trunk():
    """megatron's mtp_detach_heads (mtp.detach_heads): the trunk's gradient is the main loss's alone."""
    ((detached_trunk, detached_heads, _),) = run_distributed(_trunk_and_head_grads, 1, 1.0, True, True)
    assert detached_heads and all(g.abs().sum() > 0 for g in detached_heads.values())
    (plain_trunk,) = run_distributed(_no_mtp_trunk_grads, 1)
    for name, grad in plain_trunk.items():
        torch.testing.assert_close(detached_trunk[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _no_mtp_trunk_grads():
    """The same model's trunk gradient with every MTP loss scaled to zero (the main loss alone)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    try:
        trunk, _, _ = _trunk_and_head_grads(1.0, True)
    finally:
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return trunk
