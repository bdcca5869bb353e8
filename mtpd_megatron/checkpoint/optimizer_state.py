"""Loading megatron optimizer state into another layout, with torch's Adam — three gaps in megatron-core 0.19.2.

1. Before the first step, a DistributedOptimizer over torch's Adam cannot even describe what it wants to
   load: `state_dict()` reads `step` from the (empty) torch state (distrib_optimizer.py:839).
   -> `prime_adam_state` gives it Adam's initial state (step 0, zero moments), which changes nothing else.
2. `DistributedOptimizer.load_state_dict` hands every parameter's state a `step` tensor, then copies the
   parameter state key by key over that state's tensors, where `step` has no source -> KeyError
   (distrib_optimizer.py:1219-1224); and all parameters share that one step tensor (:1022-1027), which
   torch's Adam increments in place once per parameter. TE/Apex FusedAdam keep no `step` tensor, so GPU
   runs with TE never meet either.
   -> `load_optimizer_state` runs the same two stages with `step` held aside, then unshares it.
3. The number of sub-optimizers depends on the layout: expert parameters get their own optimizer only when
   they are expert-parallel (EP > 1 or ETP > 1), so a TP1/EP1 checkpoint holds one optimizer and an EP2 run
   has two. The tensors are keyed by parameter in the `fully_reshardable` format and load either way; the
   small common part (param groups) is regrouped here for the current sub-optimizers.
4. megatron pairs saved and current param groups by `param_group_identifier_keys`, which include the
   per-group `max_lr`, `min_lr`, `start_wd` and `end_wd` (optimizer.py:139): a resume with another
   training.lr or min_lr finds no group (KeyError in distrib_optimizer.py:970, ValueError "Could not find
   parameter group" in optimizer.py:640), and one that did match would bring back the old hyperparameters
   (`OptimizerParamScheduler.get_lr` reads `max_lr`/`min_lr` from the group, optimizer_param_scheduler.py:226).
   -> `_adopt_current_groups` pairs groups by what they contain (the identifier keys minus those
   hyperparameters), and after loading every group gets the current config's hyperparameters back; only
   the moments and step counts come from the checkpoint. The scheduler is rebuilt from the config
   (optim.py: override_opt_param_scheduler), so LR, min LR, schedule, warmup, train_iters and weight
   decay may all change on resume.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from mtpd_megatron.checkpoint.layout import CheckpointError

_PARAM_STATE_LOADERS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
}


def sub_optimizers(optimizer: MegatronOptimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def prime_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give never-stepped torch Adams their initial state (step 0, zero moments). See gap 1."""
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }


def _with_both_expert_flags(groups: list[dict]) -> list[dict]:
    """Saved param groups, plus a copy with `is_expert_parallel` flipped where no saved group has it."""

    def ident(g):
        return tuple(g.get(k, g.get(f"pre_{k}")) for k in param_group_identifier_keys)

    seen = {ident(g) for g in groups}
    out = list(groups)
    for g in groups:
        flipped = {**g, "is_expert_parallel": not g.get("is_expert_parallel", False)}
        if ident(flipped) not in seen:
            seen.add(ident(flipped))
            out.append(flipped)
    return out


def _split_distributed(state_dict: dict, n: int) -> list[dict]:
    """A loaded DistributedOptimizer state (one or several saved) -> one state per current sub-optimizer."""
    indices = sorted(k for k in state_dict if isinstance(k, int))
    saved = (
        [state_dict] if "optimizer" in state_dict else [state_dict[i] for i in indices if "optimizer" in state_dict[i]]
    )
    if not saved or "param_state_sharding_type" not in saved[0]:
        raise CheckpointError(
            "parallel.use_distributed_optimizer=true: the checkpoint's optimizer state was written by the plain "
            "(non-distributed) optimizer, which the distributed one cannot load (resume with "
            "parallel.use_distributed_optimizer=false)"
        )
    groups = _with_both_expert_flags([g for s in saved for g in s["optimizer"]["param_groups"]])
    common = {k: v for k, v in saved[0].items() if k not in ("optimizer", "param_state") and not isinstance(k, int)}
    param_states = [state_dict.get("param_state")] if n == 1 else [state_dict[i].get("param_state") for i in range(n)]
    out = []
    for param_state in param_states:
        sd = {**common, "optimizer": {**saved[0]["optimizer"], "param_groups": groups}}
        if param_state is not None:
            sd["param_state"] = param_state
        out.append(sd)
    return out


def _distributed_to_plain(opt, sd: dict) -> dict:
    """A DistributedOptimizer checkpoint loaded into a plain fp32 optimizer (use_distributed_optimizer
    switched off on resume). The `fully_reshardable` format stores the per-parameter moments under the plain
    optimizer's keys, so the tensors loaded as they are; the param groups and the step count sit in the
    distributed optimizer's common part and are moved to where FP32Optimizer.load_state_dict reads them."""
    pool: dict[tuple, list] = {}
    for g in _with_both_expert_flags(sd["optimizer"]["param_groups"]):
        pool.setdefault(_structure(g), []).append(g)
    groups = []
    for current, template in zip(opt.optimizer.param_groups, sd["param_groups"], strict=True):
        match = pool.get(_structure(current))
        if not match:
            raise CheckpointError(
                "the checkpoint's optimizer param groups do not fit this model's "
                "(resume with the parallel.use_distributed_optimizer it was written with)"
            )
        groups.append({**match.pop(0), "params": template["params"]})
    state = dict(sd["state"])
    step = next((g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g), None)
    if step is not None:
        state["common_step"] = step
    return {"state": state, "param_groups": groups}


def _split_plain(optimizer: MegatronOptimizer, state_dict) -> list:
    from megatron.core.optimizer.optimizer import FP32Optimizer

    subs = sub_optimizers(optimizer)
    if isinstance(state_dict, dict) and "param_state_sharding_type" in state_dict:
        if not all(isinstance(o, FP32Optimizer) for o in subs) or len(subs) != 1:
            raise CheckpointError(
                "parallel.use_distributed_optimizer=false: the checkpoint was written by the distributed "
                "optimizer, which converts to the plain one only for a fp32 model without expert parallelism "
                "(resume with parallel.use_distributed_optimizer=true)"
            )
        return [_distributed_to_plain(subs[0], state_dict)]
    if len(subs) == 1:
        return [state_dict]
    states = [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
    if len(states) != len(subs):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(states)} parts but this layout has {len(subs)} (expert "
            "parallelism changed): resume with parallel.use_distributed_optimizer=true, whose format reshards"
        )
    return states


# Identifier keys that are hyperparameters, not structure: the config's current values win on resume (gap 4).
_HYPERPARAMETER_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
# What a loaded param group keeps from the checkpoint: its parameters and megatron's step count.
_FROM_CHECKPOINT = ("params", "step")


def _structure(group: dict) -> tuple:
    """A param group's identity without its hyperparameters (megatron's identifier, NeMo aliases included)."""
    return tuple(
        group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys if k not in _HYPERPARAMETER_KEYS
    )


def _saved_groups(state_dict) -> list:
    """The param groups inside one sub-optimizer's loaded state (DistributedOptimizer / Float16: under
    "optimizer"; FP32Optimizer: the torch state dict itself)."""
    inner = state_dict.get("optimizer") if isinstance(state_dict, dict) else None
    if isinstance(inner, dict) and "param_groups" in inner:
        return inner["param_groups"]
    return state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []


def _adopt_current_groups(opt, state_dict) -> list[dict]:
    """Give the saved groups the current groups' hyperparameters (so megatron pairs them) and return the
    current hyperparameters of every group, to be put back after loading (gap 4)."""
    current = opt.optimizer.param_groups
    fresh = [{k: v for k, v in g.items() if k not in _FROM_CHECKPOINT} for g in current]
    pool: dict[tuple, list] = {}
    for g in _saved_groups(state_dict):
        pool.setdefault(_structure(g), []).append(g)
    for g in current:
        candidates = pool.get(_structure(g))
        if not candidates:
            continue  # megatron's own error names the group
        saved = candidates.pop(0)
        for key in _HYPERPARAMETER_KEYS:
            if key in g:
                saved[key] = g[key]
            else:
                saved.pop(key, None)
    return fresh


def _restore_hyperparameters(opt, fresh: list[dict]) -> None:
    for group, values in zip(opt.optimizer.param_groups, fresh, strict=True):
        group.update(values)


def load_optimizer_state(optimizer: MegatronOptimizer, state_dict) -> None:
    """megatron's `optimizer.load_state_dict` across layouts, for torch's Adam as well as FusedAdam."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = sub_optimizers(optimizer)
    if all(isinstance(o, DistributedOptimizer) for o in subs):
        states = _split_distributed(state_dict, len(subs))
    else:
        states = _split_plain(optimizer, state_dict)
    for opt, sd in zip(subs, states):
        fresh = _adopt_current_groups(opt, sd)
        torch_adam = isinstance(getattr(opt, "optimizer", None), torch.optim.Adam)
        if not (isinstance(opt, DistributedOptimizer) and torch_adam and "param_state" in sd):
            opt.load_state_dict(sd)
            _restore_hyperparameters(opt, fresh)
            continue
        sd = dict(sd)
        param_state, kind = sd.pop("param_state"), sd.pop("param_state_sharding_type")
        opt.load_state_dict(sd)
        held = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        try:
            getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
        finally:
            for p, step in held.items():
                opt.optimizer.state[p]["step"] = step.clone()  # one tensor per parameter (gap 2)
        _restore_hyperparameters(opt, fresh)
    if len(subs) > 1:
        optimizer._synchronize_steps()
    for opt in subs:
        _unshare_steps(opt)


def _unshare_steps(opt) -> None:
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Adam):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
