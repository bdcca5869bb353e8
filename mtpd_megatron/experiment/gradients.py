"""Where the heads' losses pull the shared trunk: gradients of the main CE, the heads' CE and the heads' KL.

The seesaw question ("does training the heads cost the main head?") is a question about gradients that meet
in the trunk. On a trained checkpoint, for a few held-out batches, this computes three gradients separately
with the arm's own MTP-D settings and loss scaling (megatron's mtp_loss_scaling_factor / num_heads):

  main_ce   the main head's mean cross-entropy alone (every MTP loss scaled to 0 in backward)
  head_ce   the heads' cross-entropy terms alone (alpha kept, beta = 0, main loss not backpropagated)
  head_kl   the heads' KL terms alone (alpha = 0, beta kept; through the teacher too when the arm does not
            detach it, and nowhere into the trunk under the trunk guard or megatron's mtp_detach_heads)

and reports, at the trunk's last layer (the final decoder hidden states, and the last decoder layer's
parameters), each gradient's norm and the cosines between them. A head term whose cosine with main_ce is
negative pushes the trunk against the main head.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

TERMS = ("main_ce", "head_ce", "head_kl")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        return None
    return float((a @ b) / (na * nb))


def trunk_gradients(model, mtp_cfg, batches: list) -> dict:
    """{"hidden": {...}, "last_layer": {...}}, each with `<term>_norm` and `cos_<a>_<b>` (None if a norm is 0)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from mtpd_megatron.mtpd import hook
    from mtpd_megatron.mtpd.metrics import MTPDMetrics

    device = next(model.parameters()).device
    heads = int(model.config.mtp_num_layers or 0) if getattr(model, "mtp", None) is not None else 0
    settings = attached = None
    if heads:
        settings = hook.MTPDSettings.from_config(mtp_cfg)
        attached = hook.attach(model.config, settings, MTPDMetrics(heads), mtp_block=model.mtp)
    last_params = [p for p in model.decoder.layers[-1].parameters() if p.requires_grad]
    captured: list = []

    def keep_grad(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.register_hook(lambda g: captured.append(g.detach().float().flatten()))

    handle = model.decoder.register_forward_hook(keep_grad)
    was_training = model.training
    model.train()  # the trunk guard's second pass runs in training mode only (dropout is 0 in every preset)
    results: dict = {}
    try:
        for term in TERMS if heads else TERMS[:1]:
            if term == "head_kl" and not any(settings.betas):
                continue
            if settings is not None:
                zero = (0.0,) * heads
                attached.settings = dataclasses.replace(
                    settings,
                    alphas=zero if term == "head_kl" else settings.alphas,
                    betas=zero if term == "head_ce" else settings.betas,
                )
            MTPLossAutoScaler.set_loss_scale(torch.tensor(0.0 if term == "main_ce" else 1.0, device=device))
            model.zero_grad(set_to_none=True)
            captured.clear()
            hidden_grad = None
            for batch in batches:
                tokens = batch["tokens"].to(device)
                labels, mask = batch["labels"].to(device), batch["loss_mask"].to(device).float()
                position_ids = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
                per_token = model(tokens, position_ids, None, labels=labels, loss_mask=mask)
                main = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
                (main if term == "main_ce" else main * 0.0).backward()
                grad = captured.pop() if captured else torch.zeros(1, device=device)
                hidden_grad = grad if hidden_grad is None else hidden_grad + grad
            param_grad = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in last_params]
            )
            results[term] = (hidden_grad, param_grad)
    finally:
        handle.remove()
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        if attached is not None:
            attached.settings = settings
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    report = {}
    for where, index in (("hidden", 0), ("last_layer", 1)):
        entry = {f"{t}_norm": float(results[t][index].norm()) for t in results}
        names = list(results)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                entry[f"cos_{a}_{b}"] = _cosine(results[a][index], results[b][index])
        report[where] = entry
    return report
