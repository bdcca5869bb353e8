"""mtp.mtpd.fused_output_layer and share_teacher_logits against today's MTP-D loss (fp32, CPU, real gloo groups).

The real GPTModel with the MTP-D hook attached, one forward/backward per variant on the same weights and
batch: the main loss and every parameter gradient must match the unfused hook's (off/off), at TP = 1 and at
TP = 2 with and without sequence parallelism; the per-head metrics must match too. The fused path must keep
no [tokens, V/tp] tensor of a head for backward (counted with saved_tensors_hooks), and the shared teacher
must save one output-layer GEMM per micro-batch (counted on the output layer's original forward).
"""

from __future__ import annotations

import pytest
import torch
from distributed_harness import run_distributed
from test_model import SINGLE, _batch, _build, tiny

from mtpd_megatron.parallel import cpu_compat

VARIANTS = {
    "base": [],
    "fused": ["mtp.mtpd.fused_output_layer=true"],
    "share": ["mtp.mtpd.share_teacher_logits=true"],
    "both": ["mtp.mtpd.fused_output_layer=true", "mtp.mtpd.share_teacher_logits=true"],
}
TP2 = ["parallel.tensor_model_parallel_size=2"]
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def _step(cfg) -> dict:
    """Forward + backward of the attached model, plain (no DDP): loss, grads, metrics, GEMM/saved counts."""
    from mtpd_megatron.mtpd import hook
    from mtpd_megatron.mtpd.fused_head import SharedMainLogits
    from mtpd_megatron.mtpd.metrics import MTPDMetrics

    model = _build(cfg)
    attached = hook.attach(
        model.config, hook.MTPDSettings.from_config(cfg.mtp), MTPDMetrics(cfg.mtp.num_heads), mtp_block=model.mtp
    )
    vocab_local = model.output_layer.weight.shape[0]
    shared = SharedMainLogits.of(model.output_layer)
    calls = {"n": 0}
    original = shared.original

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    shared.original = counting
    big = {"n": 0}

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == vocab_local and t.numel() >= 16 * vocab_local:
            big["n"] += 1
        return t

    tokens, position_ids, labels = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, position_ids, None, labels=labels)
    loss.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = attached.metrics.raw().clone()
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "gemms": calls["n"], "saved_vocab": big["n"]}


def _variants(extra) -> dict:
    return {name: _step(tiny("tiny_dense", extra + over)) for name, over in VARIANTS.items()}


def _rank_world1() -> dict:
    cpu_compat.enable()
    return _variants(SINGLE)


def _rank_world2() -> dict:
    cpu_compat.enable()
    return {
        "tp2": _variants(TP2),
        "tp2_sp": {k: _step(tiny("tiny_dense", TP2_SP + VARIANTS[k])) for k in ("base", "both")},
    }


@pytest.fixture(scope="module")
def world1() -> dict:
    return run_distributed(_rank_world1, 1)[0]


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_distributed(_rank_world2, 2)


def _assert_same(run: dict, ref: dict, what: str) -> None:
    torch.testing.assert_close(run["loss"], ref["loss"], atol=1e-6, rtol=1e-6, msg=f"{what} loss")
    assert set(run["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(run["grads"][name], grad, atol=2e-6, rtol=1e-5, msg=f"{what} {name}")
    torch.testing.assert_close(run["metrics"], ref["metrics"], atol=1e-5, rtol=1e-6, msg=f"{what} metrics")


@pytest.mark.parametrize("variant", ["fused", "share", "both"])
def test_switch_is_exact_at_tp1(world1, variant):
    ref = world1["base"]
    assert any("mtp" in n for n in ref["grads"]) and ref["grads"]["output_layer.weight"].abs().sum() > 0
    _assert_same(world1[variant], ref, variant)


@pytest.mark.parametrize("variant", ["fused", "share", "both"])
def test_switch_is_exact_at_tp2(world2, variant):
    for rank in world2:
        _assert_same(rank["tp2"][variant], rank["tp2"]["base"], f"tp2 {variant}")
        _assert_same(rank["tp2_sp"]["both"], rank["tp2_sp"]["base"], "tp2 sp both")


def test_tp2_loss_equals_tp1(world1, world2):
    for rank in world2:
        torch.testing.assert_close(rank["tp2"]["both"]["loss"], world1["base"]["loss"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank["tp2"]["both"]["metrics"], world1["base"]["metrics"], atol=1e-5, rtol=1e-6)


def test_fused_keeps_no_head_logits_and_share_saves_a_gemm(world1):
    heads = tiny("tiny_dense", SINGLE).mtp.num_heads
    assert heads >= 2
    base, fused, share, both = (world1[k] for k in ("base", "fused", "share", "both"))
    # unfused: every head's output layer keeps its [tokens, V] logits (as the gradient buffer) for backward
    assert fused["saved_vocab"] == base["saved_vocab"] - heads == 1  # left: the main loss's logits
    assert both["saved_vocab"] == fused["saved_vocab"]
    # output-layer GEMMs per micro-batch: teacher + main + heads; shared teacher: main + heads; fused: no heads
    assert base["gemms"] == heads + 2 and share["gemms"] == heads + 1
    assert fused["gemms"] == 2 and both["gemms"] == 1
