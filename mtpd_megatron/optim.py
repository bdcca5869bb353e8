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
from mtpd_megatron.parallel import cpu_compat

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
    with cpu_compat.optimizer_scope():
        return get_megatron_optimizer(optimizer_config(cfg, params_dtype), model_chunks)


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
    with cpu_compat.optimizer_scope():
        applied, grad_norm, _ = optimizer.step()
    return bool(applied), (float(grad_norm) if grad_norm is not None else None)


def prime_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give a never-stepped torch Adam its zero state (step 0, zero moments) so a checkpoint can be loaded.

    Without Apex/TE, megatron's DistributedOptimizer reads `step` from the inner torch optimizer's state
    while building the sharded state dict to load into (distrib_optimizer.py:839), which is empty before
    the first step. Zero moments at step 0 are exactly what Adam starts from, so this changes nothing else.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


_PARAM_STATE_LOADERS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
}


def load_optimizer_state(optimizer: MegatronOptimizer, state_dict) -> None:
    """megatron's `optimizer.load_state_dict`, working with torch's Adam as well as TE/Apex FusedAdam.

    DistributedOptimizer.load_state_dict first gives every torch-Adam state a `step` tensor, then copies the
    parameter state key by key over the state's tensors (distrib_optimizer.py:1219-1224), where `step` has
    no source -> KeyError (TE's FusedAdam keeps no `step` tensor, so GPU runs with TE never see it). We do
    the same two stages with `step` held aside during the copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        pairs = [(optimizer, state_dict)]
    elif len(chained) == 1:
        pairs = [(chained[0], state_dict)]
    else:
        states = [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
        pairs = list(zip(chained, states))
    with cpu_compat.optimizer_scope():
        for opt, sd in pairs:
            torch_adam = isinstance(getattr(opt, "optimizer", None), torch.optim.Adam)
            if not (isinstance(opt, DistributedOptimizer) and torch_adam and "param_state" in sd):
                opt.load_state_dict(sd)
                continue
            sd = dict(sd)
            param_state, kind = sd.pop("param_state"), sd.pop("param_state_sharding_type")
            opt.load_state_dict(sd)
            held = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
            try:
                getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
            finally:
                for p, step in held.items():
                    opt.optimizer.state[p]["step"] = step
        if chained is not None and len(chained) > 1:
            optimizer._synchronize_steps()
        for opt, _ in pairs:
            _unshare_steps(opt)


def _unshare_steps(opt) -> None:
    """One `step` tensor per parameter again.

    The load above (megatron, distrib_optimizer.py:1022-1027) hands every parameter the *same* step
    tensor; torch's Adam increments each parameter's step in place, so a shared one advanced once per
    parameter per update and skewed the bias correction after a resume.
    """
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Adam):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def current_lr(optimizer: MegatronOptimizer) -> float:
    for group in optimizer.param_groups:
        if not group.get("is_decoupled_lr", False):
            lr = group["lr"]
            return float(lr.item() if torch.is_tensor(lr) else lr)
    return 0.0
