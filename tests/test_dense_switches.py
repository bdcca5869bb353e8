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
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_distributed(_rank, 1)[0]


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
