"""training.foreach_multi_tensor: megatron's grad norm, clip and main-to-model copy on torch's foreach kernels
equal megatron's own per-tensor fallbacks (real megatron functions, gloo group, fp32 and bf16 tensors).

The trainer-level check (same losses with the switch on and off) is in tests/test_bench_train.py; here each
bound function is compared directly, so a binding that silently stayed megatron's cannot pass.
"""

from __future__ import annotations

import torch
from distributed_harness import run_distributed


def _tensors(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (130,), (3, 4, 6), (1,)]
    return [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]


def _run(enabled: bool) -> dict:
    from megatron.core.optimizer import clip_grads, optimizer

    from mtpd_megatron.optim import _foreach_l2_norm, _foreach_scale, use_foreach_multi_tensor_ops
    from mtpd_megatron.parallel.cpu_compat import _mapped  # megatron's device='cuda' literals -> CPU

    grad_norm = _mapped(clip_grads.get_grad_norm_fp32)
    clip = _mapped(clip_grads.clip_grad_by_total_norm_fp32)

    changed = use_foreach_multi_tensor_ops(enabled)
    bound = {
        "norm": clip_grads.l2_norm_impl is _foreach_l2_norm,
        "clip_scale": clip_grads.multi_tensor_scale_impl is _foreach_scale,
        "copy_scale": optimizer.multi_tensor_scale_impl is _foreach_scale,
    }
    grads = _tensors(1)
    norm = grad_norm(grads)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip(params, max_norm=1.0, total_norm=norm)
    main = _tensors(2)
    model = [torch.empty_like(t, dtype=torch.bfloat16) for t in main]
    optimizer._multi_tensor_copy_this_to_that(main, model, torch.zeros(1, dtype=torch.int))
    empty = grad_norm([])
    use_foreach_multi_tensor_ops(False)  # leave megatron's fallbacks bound for later tests in this process
    return {
        "changed": changed,
        "bound": bound,
        "norm": float(norm),
        "empty": float(empty),
        "clipped": [p.grad.clone() for p in params],
        "copied": model,
    }


def _rank() -> dict:
    return {"foreach": _run(True), "megatron": _run(False)}


def test_foreach_bindings_equal_megatrons_fallbacks():
    out = run_distributed(_rank, 1)[0]
    on, off = out["foreach"], out["megatron"]
    assert on["changed"] == 3 and all(on["bound"].values())
    assert not any(off["bound"].values())
    ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _tensors(1)])).item()
    assert on["norm"] > 1.0  # the clip below scales
    assert abs(on["norm"] - ref) < 1e-5 * ref
    assert abs(on["norm"] - off["norm"]) < 1e-5 * ref
    assert on["empty"] == off["empty"] == 0.0
    for a, b in zip(on["clipped"], off["clipped"]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    coeff = 1.0 / (ref + 1e-6)
    for a, g in zip(on["clipped"], _tensors(1)):
        torch.testing.assert_close(a, g * coeff, atol=1e-7, rtol=1e-5)
    for a, b in zip(on["copied"], off["copied"]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=0, rtol=0)
