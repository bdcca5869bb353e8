"""model.compile_layers in its eager form (CPU): megatron's fused SwiGLU path and the compiled norms give the
same loss and gradients as the default model (fp32, real megatron layers).

torch.compile itself is not exercised here: on 2 CPU cores inductor takes tens of seconds per graph. With
`torch._dynamo.config.disable` the compiled callables run their Python bodies eagerly, so what is checked is
the switch's code path (megatron's `bias_swiglu_impl` / `weighted_bias_swiglu_impl` with their hand-written
backward instead of MLP's plain SwiGLU, inside SequentialMLP and GroupedGemmExperts alike, and the norms
routed through one compiled `F.rms_norm`); the compiled kernels' numerics are measured on the GPU by tools/bench_train.py
(`--compare compile_layers` reports each run's losses). training.fused_adam is checked end to end through the
real trainer in tests/test_bench_train.py.
"""

from __future__ import annotations

import pytest
import torch
from distributed_harness import run_distributed
from test_model import SINGLE, _batch, _build, tiny

from mtpd_megatron.parallel import cpu_compat


def _grads(cfg) -> dict:
    model = _build(cfg)
    tokens, position_ids, labels = _batch()
    loss = model(tokens, position_ids, None, labels=labels)
    loss.mean().backward()
    compiled = sum(1 for m in model.modules() if getattr(m, "_mtpd_compiled", False))
    return {
        "loss": loss.detach(),
        "compiled": compiled,
        "fusion": model.config.bias_activation_fusion,
        "rope_fusion": model.config.apply_rope_fusion,
        "rope_calls": _ROPE_CALLS.pop("n", 0),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


_ROPE_CALLS: dict = {}


def _count_rope_calls() -> None:
    """Count the calls of the RoPE bound to megatron's fusion hook (the switch's path, not megatron's unfused one)."""
    from megatron.core.models.common.embeddings import rope_utils

    from mtpd_megatron.model import builder

    builder.enable_rope_fusion()
    bound = rope_utils.fused_apply_rotary_pos_emb

    def counted(*args, **kwargs):
        _ROPE_CALLS["n"] = _ROPE_CALLS.get("n", 0) + 1
        return bound(*args, **kwargs)

    rope_utils.fused_apply_rotary_pos_emb = counted


def _rank() -> dict:
    cpu_compat.enable()
    torch._dynamo.config.disable = True  # eager bodies of the compiled callables (see module docstring)
    _count_rope_calls()
    out = {}
    for preset in ("tiny_dense", "tiny_moe"):
        for flag in ("false", "true"):
            out[f"{preset}:{flag}"] = _grads(tiny(preset, SINGLE + [f"model.compile_layers={flag}"]))
    out["ce"] = _fused_ce_vs_unfused()
    out["ce_flags"] = {
        dtype: tiny_transformer_config(torch.bfloat16 if dtype == "bf16" else torch.float32)
        for dtype in ("bf16", "fp32")
    }
    return out


def tiny_transformer_config(dtype) -> bool:
    from mtpd_megatron.config import load_config
    from mtpd_megatron.model.builder import transformer_config

    cfg = load_config("configs/tiny_dense.yaml", SINGLE + ["model.compile_layers=true"])
    return transformer_config(cfg, params_dtype=dtype).cross_entropy_loss_fusion


def _fused_ce_vs_unfused() -> dict:
    """megatron's fused CE (what compile_layers selects in bf16) against its unfused one on bf16 logits."""
    import torch.distributed as dist
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(3)
    logits0 = (torch.randn(16, 2, 384, generator=gen) * 3).to(torch.bfloat16)
    target = torch.randint(0, 384, (16, 2), generator=gen)
    grad_out = torch.rand(16, 2, generator=gen)
    out = {}
    for name, fn in (
        ("fused", lambda x: fused_vocab_parallel_cross_entropy(x, target, dist.group.WORLD)),
        ("unfused", lambda x: vocab_parallel_cross_entropy(x.float(), target)),  # as compute_language_model_loss
    ):
        x = logits0.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward(grad_out)
        out[name] = {"loss": loss.detach(), "grad": x.grad, "logits_unchanged": torch.equal(x.detach(), logits0)}
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_distributed(_rank, 1)[0]


def test_fused_cross_entropy_is_chosen_in_bf16_only_and_equals_the_unfused_one(runs):
    assert runs["ce_flags"] == {"bf16": True, "fp32": False}  # its backward casts to bf16 (see builder.py)
    fused, unfused = runs["ce"]["fused"], runs["ce"]["unfused"]
    assert fused["grad"].dtype == unfused["grad"].dtype == torch.bfloat16
    torch.testing.assert_close(fused["loss"], unfused["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["grad"].float(), unfused["grad"].float(), atol=1e-2, rtol=1e-2)
    assert fused["logits_unchanged"] and unfused["logits_unchanged"]  # the shared teacher's logits stay intact


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_compile_layers_eager_path_is_exact(runs, preset):
    off, on = runs[f"{preset}:false"], runs[f"{preset}:true"]
    assert on["fusion"] and not off["fusion"]
    assert on["rope_fusion"] and not off["rope_fusion"]
    assert on["rope_calls"] > 0 and off["rope_calls"] == 0  # q and k of every layer through the compiled RoPE
    assert on["compiled"] > 0 and off["compiled"] == 0
    torch.testing.assert_close(on["loss"], off["loss"], atol=1e-6, rtol=1e-6)
    assert set(on["grads"]) == set(off["grads"])
    for name, grad in off["grads"].items():
        torch.testing.assert_close(on["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
