"""megatron-core's optimizer and LR schedule, configured from `cfg.training`.

AdamW through `get_megatron_optimizer` (mixed precision with fp32 main params under bf16; the
DistributedOptimizer when `parallel.use_distributed_optimizer`), and `OptimizerParamScheduler` with linear
warmup followed by cosine, WSD or constant. The config is the source of truth on resume: the scheduler
takes only its step count from a checkpoint (`override_opt_param_scheduler`), so a run can be extended
by raising `training.train_iters`.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtpd_megatron.config.schema import Config

_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def optimizer_config(cfg: Config, params_dtype: torch.dtype) -> OptimizerConfig:
    t = cfg.training
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def build_optimizer(cfg: Config, model_chunks: list, params_dtype: torch.dtype) -> MegatronOptimizer:
    """AdamW over the DDP-wrapped model chunks (a ChainedOptimizer when there are expert parameters)."""
    use_foreach_multi_tensor_ops(cfg.training.foreach_multi_tensor)
    optimizer = get_megatron_optimizer(optimizer_config(cfg, params_dtype), model_chunks)
    if cfg.training.fused_adam:
        use_fused_adamw(optimizer)
    return optimizer


def use_fused_adamw(optimizer: MegatronOptimizer) -> int:
    """Switch the torch AdamW inside megatron's optimizer(s) to torch's fused kernel; returns how many.

    Without TE/apex megatron builds `torch.optim.AdamW` with torch's default (foreach) implementation
    (megatron/core/optimizer/__init__.py); `fused` is read per param group at every step, so flipping it
    after construction selects `torch._fused_adamw_` with the same state (exp_avg, exp_avg_sq, step) and the
    same update rule. TE's/apex's FusedAdam (when megatron found one) is left alone."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    switched = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            group["fused"], group["foreach"] = True, False
        torch_opt.defaults["fused"], torch_opt.defaults["foreach"] = True, False
        switched += 1
    return switched


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron/core/utils.py:1325 `local_multi_tensor_l2_norm`: the L2 norm of all tensors of
    `tensor_lists[0]` as a [1] fp32 tensor on their device, without reading anything on the host."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None  # megatron's fallback returns no per-tensor norms either


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron/core/utils.py:1337 `local_multi_tensor_scale`: dst = src * scale per pair
    (dtype converted on the copy, as `dst.copy_(src * scale)`), in place when src is dst."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


# (module, attribute, megatron's local fallback it replaces, the foreach version)
_FOREACH_BINDINGS = (
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "local_multi_tensor_l2_norm", _foreach_l2_norm),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl", "local_multi_tensor_scale", _foreach_scale),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", "local_multi_tensor_scale", _foreach_scale),
)


def use_foreach_multi_tensor_ops(enabled: bool) -> int:
    """Bind torch's foreach kernels (or megatron's own fallbacks back) where megatron found neither TE nor apex.

    Without them megatron-core 0.19.2 binds `megatron.core.utils.local_multi_tensor_l2_norm` and
    `local_multi_tensor_scale` (optimizer/clip_grads.py:44-46, optimizer/optimizer.py:37-38): the grad norm
    takes one `torch.norm` per parameter and then `torch.tensor(list of 0-d device tensors)`, which reads
    every norm on the host (one sync per parameter: ~1,400 per step for 6 MoE layers of 128 experts), and
    the clip/copy runs two kernels per tensor. torch's `_foreach_norm` / `_foreach_mul_` / `_foreach_copy_`
    (what `torch.nn.utils.clip_grad_norm_` and `torch.optim` use) do the same math in a few launches per list.
    Process-wide (module attributes), so each optimizer build sets it from its config; TE's or apex's
    kernels, where megatron bound them, are never touched. Returns how many bindings were (re)set."""
    import importlib

    from megatron.core import utils as mcore_utils

    changed = 0
    for module_name, attr, fallback_name, foreach in _FOREACH_BINDINGS:
        module = importlib.import_module(module_name)
        fallback = getattr(mcore_utils, fallback_name)
        if getattr(module, attr) not in (fallback, foreach):
            continue  # TE's or apex's multi-tensor kernel
        setattr(module, attr, foreach if enabled else fallback)
        changed += 1
    return changed


def build_scheduler(cfg: Config, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to `lr`, then decay to `min_lr` by `train_iters` (one scheduler step per update)."""
    t = cfg.training
    decay_steps = max(t.train_iters, t.lr_warmup_iters + 1)
    wsd_steps = None
    if t.lr_schedule == "wsd":
        wsd_steps = t.wsd_decay_iters if t.wsd_decay_iters is not None else max(1, t.train_iters // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=min(t.min_lr, t.lr),
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=decay_steps,
        lr_decay_style=_DECAY_STYLE[t.lr_schedule],
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style="linear" if wsd_steps else None,
    )


def optimizer_step(optimizer: MegatronOptimizer) -> tuple[bool, float | None]:
    """One update (clip + AdamW); returns (applied, grad norm before clipping)."""
    applied, grad_norm, _ = optimizer.step()
    return bool(applied), (float(grad_norm) if grad_norm is not None else None)


def current_lr(optimizer: MegatronOptimizer) -> float:
    for group in optimizer.param_groups:
        if not group.get("is_decoupled_lr", False):
            lr = group["lr"]
            return float(lr.item() if torch.is_tensor(lr) else lr)
    return 0.0
