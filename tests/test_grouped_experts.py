"""GroupedGemmExperts against megatron's SequentialMLP on real megatron MoE layers and gloo groups (CPU, fp32).

On CPU the grouped module runs its per-expert loop fallback on the stacked weights (torch's CPU grouped_mm
has no working backward); the CUDA grouped_mm path is checked against megatron's loop by tools/bench_train.py
(`grouped_check` in its JSON). Covered here: the module's forward/backward equal SequentialMLP's on the same
weights (with an expert that receives no token), whole-model training steps equal with either experts module,
EP = 2 (grouped) equal to EP = 1 (sequential), and identical state_dict / sharded_state_dict keys, so
checkpoints move between the two modules.
"""

from __future__ import annotations

import pytest
import torch
from distributed_harness import run_distributed
from test_model import SINGLE, _build, _train_step, tiny  # the model tests' seeded tiny builds

from mtpd_megatron.parallel import cpu_compat

GROUPED = ["model.moe.experts_backend=grouped"]
SEQUENTIAL = ["model.moe.experts_backend=sequential"]
EP2 = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]


def _module_pair() -> dict:
    """One MoE layer's experts: the grouped forward (loop fallback) and megatron's, same inputs."""
    from mtpd_megatron.model.grouped_experts import GroupedGemmExperts, grouped_linear

    model = _build(tiny("tiny_moe", SINGLE + GROUPED))
    experts = model.decoder.layers[1].mlp.experts
    assert type(experts) is GroupedGemmExperts
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([5, 0, 9, 3])  # expert 1 gets no token
    x0 = torch.randn(int(counts.sum()), model.config.hidden_size, generator=gen)
    p0 = torch.rand(int(counts.sum()), generator=gen)
    grad_out = torch.randn(int(counts.sum()), model.config.hidden_size, generator=gen)
    out = {}
    for name, fn in (("grouped", experts.forward), ("sequential", experts.reference_forward)):
        experts.zero_grad(set_to_none=True)
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        y, bias = fn(x, counts, p)
        y.backward(grad_out)
        out[name] = {
            "y": y.detach(),
            "dx": x.grad,
            "dp": p.grad,
            "bias": bias,
            "dw": {n: q.grad.clone() for n, q in experts.named_parameters()},
        }
    w = experts.weight1.detach()
    gmm = None
    if hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        try:  # the grouped kernel's forward, where this torch has one on CPU
            gmm = (
                grouped_linear(x0, w, counts.tolist(), offsets, True),
                grouped_linear(x0, w, counts.tolist(), offsets, False),
            )
        except RuntimeError:
            gmm = None
    return {"pair": out, "gmm": gmm}


def _checkpoint_keys(model) -> dict:
    """What a torch_dist checkpoint stores: {ShardedTensor.key: [(global shape, offset, box size)]} of the boxes
    this rank writes (its main replicas)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    boxes = {}
    for item in model.sharded_state_dict().values():
        built = item.build() if isinstance(item, ShardedTensorFactory) else item
        for sh in nested_values(built) if isinstance(built, (dict, list)) else [built]:
            if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
                size = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                boxes.setdefault(sh.key, []).append((tuple(sh.global_shape), tuple(sh.global_offset), size))
    return boxes


def _coverage(*box_maps: dict) -> dict:
    """{key: (global shape, how often each element is written)} over ranks: same tensors, written once each."""
    out = {}
    for boxes in box_maps:
        for key, entries in boxes.items():
            shape = entries[0][0]
            count = out.setdefault(key, (shape, torch.zeros(shape, dtype=torch.int16)))[1]
            for global_shape, offset, size in entries:
                assert global_shape == shape, key
                count[tuple(slice(o, o + n) for o, n in zip(offset, size))] += 1
    return out


def _same_coverage(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0] == b[key][0], key
        assert torch.equal(a[key][1], b[key][1]) and int(a[key][1].min()) == 1 == int(a[key][1].max()), key


def _keys(cfg) -> dict:
    model = _build(cfg)
    return {
        "state": sorted(model.state_dict()),
        "sharded": _checkpoint_keys(model),
        "types": sorted(
            {type(m).__name__ for m in model.modules() if "MLP" in type(m).__name__ or "Experts" in type(m).__name__}
        ),
        "weights": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def _swap_logits() -> dict:
    """Weights saved from the grouped model, loaded into the sequential one (strict): same logits."""
    grouped = _build(tiny("tiny_moe", SINGLE + GROUPED))
    state = grouped.state_dict()
    sequential = _build(tiny("tiny_moe", SINGLE + SEQUENTIAL))
    with torch.no_grad():
        for p in sequential.parameters():
            p.zero_()
    sequential.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 1000, (2, 32), generator=gen)
    pos = torch.arange(32).unsqueeze(0).expand(2, 32)
    with torch.no_grad():
        return {"grouped": grouped(tokens, pos, None), "sequential": sequential(tokens, pos, None)}


def _rank_world1() -> dict:
    cpu_compat.enable()
    return {
        "module": _module_pair(),
        "keys_grouped": _keys(tiny("tiny_moe", SINGLE + GROUPED)),
        "keys_sequential": _keys(tiny("tiny_moe", SINGLE + SEQUENTIAL)),
        "swap": _swap_logits(),
        "step_grouped": _train_step(tiny("tiny_moe", SINGLE + GROUPED)),
        "step_sequential": _train_step(tiny("tiny_moe", SINGLE + SEQUENTIAL)),
    }


def _rank_world2() -> dict:
    cpu_compat.enable()
    return {
        "ep2_grouped": _train_step(tiny("tiny_moe", EP2 + GROUPED)),
        "ep2_keys": _checkpoint_keys(_build(tiny("tiny_moe", EP2 + GROUPED))),
    }


@pytest.fixture(scope="module")
def world1() -> dict:
    return run_distributed(_rank_world1, 1)[0]


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_distributed(_rank_world2, 2)


def test_grouped_forward_backward_equal_sequential_mlp(world1):
    pair = world1["module"]["pair"]
    g, s = pair["grouped"], pair["sequential"]
    assert g["bias"] is None and s["bias"] is None
    for key in ("y", "dx", "dp"):
        torch.testing.assert_close(g[key], s[key], atol=1e-6, rtol=1e-6, msg=key)
    assert set(g["dw"]) == set(s["dw"]) == {"weight1", "weight2"}  # the stacked weights; megatron's loop on views
    assert g["dw"]["weight1"].shape[0] == 4  # 4 experts
    for name in s["dw"]:
        torch.testing.assert_close(g["dw"][name], s["dw"][name], atol=1e-6, rtol=1e-6, msg=name)
    assert s["dw"]["weight1"][1].abs().sum() == 0  # the expert without tokens
    assert s["dw"]["weight1"][0].abs().sum() > 0


def test_grouped_mm_kernel_forward_matches_the_loop(world1):
    gmm = world1["module"]["gmm"]
    if gmm is None:
        pytest.skip("this torch has no CPU grouped_mm forward")
    torch.testing.assert_close(gmm[0], gmm[1], atol=1e-5, rtol=1e-5)


def test_checkpoint_keys_are_sequential_mlps(world1):
    g, s = world1["keys_grouped"], world1["keys_sequential"]
    assert "GroupedGemmExperts" in g["types"] and "GroupedGemmExperts" not in s["types"]
    assert g["state"] == s["state"]  # state_dict(): SequentialMLP's per-expert names (views of the stacked)
    # the same global tensors, each element written once: the stacked slab where SequentialMLP writes experts
    _same_coverage(_coverage(g["sharded"]), _coverage(s["sharded"]))
    fc1 = [k for k in g["sharded"] if k.endswith("mlp.experts.experts.linear_fc1.weight")]
    assert fc1 and all(len(g["sharded"][k]) == 1 < len(s["sharded"][k]) for k in fc1)  # one slab vs per expert
    for name, value in s["weights"].items():  # same seeded weights: the module change draws nothing else
        torch.testing.assert_close(g["weights"][name], value, atol=0, rtol=0, msg=name)


def test_grouped_weights_load_into_sequential_model(world1):
    torch.testing.assert_close(world1["swap"]["grouped"], world1["swap"]["sequential"], atol=1e-6, rtol=0)


def test_training_step_equal_with_either_experts_module(world1):
    g, s = world1["step_grouped"], world1["step_sequential"]
    assert s["loss1"].mean() < s["loss0"].mean() - 1e-3
    for key in ("loss0", "loss1", "logits"):
        torch.testing.assert_close(g[key], s[key], atol=1e-5, rtol=0, msg=key)


def test_expert_parallel_2_grouped_equals_single_process_sequential(world1, world2):
    ref = world1["step_sequential"]
    for rank in world2:
        for key in ("loss0", "loss1"):
            torch.testing.assert_close(rank["ep2_grouped"][key], ref[key], atol=1e-5, rtol=0, msg=key)
    # EP = 2 ranks each write their experts' shards; together the same checkpoint keys as EP = 1 sequential.
    _same_coverage(
        _coverage(world2[0]["ep2_keys"], world2[1]["ep2_keys"]), _coverage(world1["keys_sequential"]["sharded"])
    )
