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
"""

from __future__ import annotations

import torch

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from mtpd_megatron.checkpoint.layout import CheckpointError
from mtpd_megatron.parallel import cpu_compat

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
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


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
    saved = [state_dict] if "optimizer" in state_dict else [state_dict[i] for i in indices if "optimizer" in state_dict[i]]
    if not saved:
        raise CheckpointError("checkpoint holds no optimizer param groups (was it saved by this trainer?)")
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


def _split_plain(optimizer: MegatronOptimizer, state_dict) -> list:
    subs = sub_optimizers(optimizer)
    if len(subs) == 1:
        return [state_dict]
    states = [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
    if len(states) != len(subs):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(states)} parts but this layout has {len(subs)} (expert "
            "parallelism changed): resume with parallel.use_distributed_optimizer=true, whose format reshards")
    return states


def load_optimizer_state(optimizer: MegatronOptimizer, state_dict) -> None:
    """megatron's `optimizer.load_state_dict` across layouts, for torch's Adam as well as FusedAdam."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = sub_optimizers(optimizer)
    if all(isinstance(o, DistributedOptimizer) for o in subs):
        states = _split_distributed(state_dict, len(subs))
    else:
        states = _split_plain(optimizer, state_dict)
    with cpu_compat.optimizer_scope():
        for opt, sd in zip(subs, states):
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
                    opt.optimizer.state[p]["step"] = step.clone()  # one tensor per parameter (gap 2)
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
