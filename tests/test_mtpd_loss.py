"""MTP-D head loss on vocabulary-sharded logits vs the plain float64 reference (loss AND gradients).

Each rank holds a vocabulary shard of the same float64 logits; results are compared in the parent process
with the single-process reference of mtpd_megatron.mtpd.reference.
"""

import itertools

import pytest
import torch
from distributed_harness import run_distributed

from mtpd_megatron.mtpd.kl import DistillSpec, head_loss, teacher_stats, vocab_shard
from mtpd_megatron.mtpd.reference import reference_head_loss, topn_set

V, H, T = 48, 8, 19
ALPHA, BETA = 0.7, 1.3


def make_case(seed: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    teacher = torch.randn(T, V, generator=g, dtype=torch.float64) * 2.0
    if ties:  # many logits equal to the same value around the TopN threshold
        teacher = torch.round(teacher)
    labels = torch.randint(0, V, (T,), generator=g)
    upstream = torch.rand(T, generator=g, dtype=torch.float64)
    upstream[::5] = 0.0  # masked positions
    return hidden, weight, teacher, labels, upstream


LK_LAMBDA = 0.3
VARIANTS = {  # name -> (objective, teacher gradient): the paper's KL, the LK objective, the seesaw ablation
    "kl": ("kl", False),
    "lk": ("lk", False),
    "kl_seesaw": ("kl", True),
    "lk_seesaw": ("lk", True),
}


def grid(tp: int, variant: str = "kl"):
    shard = V // tp
    topns = sorted({3, shard, shard + 5, 0})  # below, equal to and above V/tp; 0 = full vocabulary
    temps = [1.0, 2.0] if variant == "kl" else [1.5]
    return list(itertools.product(topns, ["forward", "reverse"], ["renorm", "tail"], temps))


def sharded_run(tp: int, ties: bool, chunk_tokens: int, variant: str = "kl"):
    """On each rank: head loss on the local shard; per case (loss, grads of hidden, of its W shard, of the teacher)."""
    import torch.distributed as dist

    group = dist.group.WORLD
    objective, seesaw = VARIANTS[variant]
    results = []
    for case_id, (topn, direction, mode, temp) in enumerate(grid(tp, variant)):
        hidden, weight, teacher, labels, upstream = make_case(case_id, ties)
        start, size = vocab_shard(V, group)
        h = hidden.clone().requires_grad_(True)
        w = weight[start : start + size].clone().requires_grad_(True)
        # The teacher's logits depend on a tensor that requires grad (like the main head's hidden states):
        # the loss must send it no gradient, except in the seesaw ablation.
        t_param = teacher[:, start : start + size].clone().requires_grad_(True)
        t_logits = t_param * 1.0
        spec = DistillSpec(
            topn=topn, direction=direction, mode=mode, temperature=temp, objective=objective, lk_lambda=LK_LAMBDA
        )
        stats = teacher_stats(t_logits.detach(), spec, V, start, group, chunk_tokens=chunk_tokens)
        logits = h @ w.t()  # column-parallel output layer: [T, V/tp]
        out = head_loss(
            logits,
            t_logits,
            stats,
            labels,
            alpha=ALPHA,
            beta=BETA,
            spec=spec,
            vocab_size=V,
            vocab_start=start,
            group=group,
            chunk_tokens=chunk_tokens,
            inplace_grad=True,
            teacher_grad=seesaw,
        )
        (out.loss * upstream).sum().backward()
        grad_h = h.grad.clone()
        dist.all_reduce(grad_h, group=group)  # what ColumnParallelLinear's backward does for its input
        grad_w = [torch.empty_like(w.grad) for _ in range(tp)]
        dist.all_gather(grad_w, w.grad.contiguous(), group=group)
        grad_t = None
        if t_param.grad is not None:
            parts = [torch.empty_like(t_param.grad) for _ in range(tp)]
            dist.all_gather(parts, t_param.grad.contiguous(), group=group)
            grad_t = torch.cat(parts, dim=-1)
        results.append(
            dict(
                loss=out.loss.detach(),
                ce=out.ce,
                kl=out.kl,
                grad_h=grad_h,
                grad_w=torch.cat(grad_w),
                teacher_grad=grad_t,
                argmax=out.student_argmax,
            )
        )
    return results


def reference(case_id: int, topn, direction, mode, temp, ties, variant: str = "kl"):
    objective, seesaw = VARIANTS[variant]
    hidden, weight, teacher, labels, upstream = make_case(case_id, ties)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss, ce, kl = reference_head_loss(
        h @ w.t(),
        t,
        labels,
        alpha=ALPHA,
        beta=BETA,
        topn=topn,
        direction=direction,
        mode=mode,
        temperature=temp,
        objective=objective,
        lk_lambda=LK_LAMBDA,
        detach_teacher=not seesaw,
    )
    (loss * upstream).sum().backward()
    return dict(
        loss=loss.detach(),
        ce=ce,
        kl=kl,
        grad_h=h.grad,
        grad_w=w.grad,
        teacher_grad=t.grad,
        argmax=(hidden @ weight.t()).argmax(-1),
    )


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loss_and_gradients_match_reference(tp):
    per_rank = run_distributed(sharded_run, tp, tp, False, 7)
    for case_id, params in enumerate(grid(tp)):
        ref = reference(case_id, *params, ties=False)
        for rank in range(tp):
            got = per_rank[rank][case_id]
            for key in ("loss", "ce", "kl", "grad_h", "grad_w"):
                torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=1e-10, msg=f"{key} {params} tp={tp}")
            assert got["teacher_grad"] is None, "the teacher (main head) must receive no gradient"
            assert torch.equal(got["argmax"], ref["argmax"])


@pytest.mark.parametrize("variant", ["lk", "kl_seesaw", "lk_seesaw"])
@pytest.mark.parametrize("tp", [1, 2])
def test_lk_and_seesaw_gradients_match_reference(tp, variant):
    """LK (lambda KL + (1 - lambda) TV) and the no-stop-gradient ablation: loss, student and teacher gradients."""
    per_rank = run_distributed(sharded_run, tp, tp, False, 7, variant)
    for case_id, params in enumerate(grid(tp, variant)):
        ref = reference(case_id, *params, ties=False, variant=variant)
        for rank in range(tp):
            got = per_rank[rank][case_id]
            for key in ("loss", "ce", "kl", "grad_h", "grad_w"):
                torch.testing.assert_close(
                    got[key], ref[key], rtol=1e-9, atol=1e-10, msg=f"{key} {params} tp={tp} {variant}"
                )
            if VARIANTS[variant][1]:
                assert ref["teacher_grad"].abs().sum() > 0
                torch.testing.assert_close(
                    got["teacher_grad"],
                    ref["teacher_grad"],
                    rtol=1e-9,
                    atol=1e-10,
                    msg=f"teacher grad {params} tp={tp} {variant}",
                )
            else:
                assert got["teacher_grad"] is None


@pytest.mark.parametrize("tp", [1, 2])
def test_ties_at_threshold_are_deterministic(tp):
    """Integer-valued teachers tie massively at the threshold: every tied logit is kept, at any TP size."""
    per_rank = run_distributed(sharded_run, tp, tp, True, 5)
    for case_id, params in enumerate(grid(tp)):
        ref = reference(case_id, *params, ties=True)
        for got in (r[case_id] for r in per_rank):
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(got["grad_h"], ref["grad_h"], rtol=1e-9, atol=1e-10)
    _, _, teacher, _, _ = make_case(0, ties=True)
    kept = topn_set(teacher, 5)
    assert bool((kept.sum(-1) >= 5).all())
    assert bool((kept.sum(-1) > 5).any()), "the test data should contain ties at the threshold"


def test_zero_beta_is_plain_cross_entropy():
    hidden, weight, teacher, labels, upstream = make_case(3)
    logits = (hidden @ weight.t()).requires_grad_(True)
    spec = DistillSpec(topn=5)
    stats = teacher_stats(teacher, spec, V, 0)
    out = head_loss(logits, teacher, stats, labels, alpha=1.0, beta=0.0, spec=spec, vocab_size=V, vocab_start=0)
    (out.loss * upstream).sum().backward()
    ref = torch.nn.functional.cross_entropy(logits.detach().requires_grad_(True), labels, reduction="none")
    torch.testing.assert_close(out.loss.detach(), ref.detach())
    logits2 = logits.detach().clone().requires_grad_(True)
    (torch.nn.functional.cross_entropy(logits2, labels, reduction="none") * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, logits2.grad)


def test_inplace_gradient_reuses_logit_storage():
    """With inplace_grad the student's storage holds its gradient: no extra [T, V] buffer is allocated."""
    hidden, weight, teacher, labels, _ = make_case(4)
    base = (hidden @ weight.t()).requires_grad_(True)
    logits = base * 1.0  # non-leaf, like the output layer's result
    spec = DistillSpec(topn=7)
    out = head_loss(
        logits,
        teacher,
        teacher_stats(teacher, spec, V, 0),
        labels,
        alpha=1.0,
        beta=1.0,
        spec=spec,
        vocab_size=V,
        vocab_start=0,
        inplace_grad=True,
    )
    ptr = logits.data_ptr()
    out.loss.sum().backward()
    ref_logits = (hidden @ weight.t()).requires_grad_(True)
    ref, _, _ = reference_head_loss(
        ref_logits, teacher, labels, alpha=1.0, beta=1.0, topn=7, direction="forward", mode="renorm", temperature=1.0
    )
    ref.sum().backward()
    torch.testing.assert_close(base.grad, ref_logits.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits.detach(), ref_logits.grad, rtol=1e-9, atol=1e-10)  # storage now holds the grad
    assert logits.data_ptr() == ptr
