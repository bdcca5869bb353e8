"""The GPT+MTP model on real megatron-core layers and real gloo process groups (CPU).

Two spawned groups do all the megatron work (each spawn costs ~5 s of imports, so one world-1 run and one
world-2 run cover every case): parameter counts against the formula, SDPA against megatron's reference
attention, and train steps under TP/EP/SP layouts compared with the single-process TP=1 model.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from distributed_harness import run_distributed

from mtpd_megatron.config import load_config
from mtpd_megatron.config.params import count_parameters
from mtpd_megatron.parallel import cpu_compat

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
VOCAB = 1000  # tokenizer size; padded to 1024 at TP 1 and 2
SEQ, BATCH, SEED, LR = 32, 2, 1234, 0.5

# Layouts on two ranks: (name, preset, overrides). TP=1 means two data-parallel replicas fed the same batch,
# which must reproduce the single-process model exactly like the tensor-parallel layouts must.
SINGLE = [
    "parallel.tensor_model_parallel_size=1",
    "parallel.expert_model_parallel_size=1",
    "parallel.sequence_parallel=false",
]
LAYOUTS = {
    "dense_dp2": ("tiny_dense", SINGLE),
    "dense_tp2": ("tiny_dense", ["parallel.tensor_model_parallel_size=2"]),
    "dense_tp2_sp": ("tiny_dense", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "moe_ep2_dp2": ("tiny_moe", ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]),
    "moe_tp2_sp": ("tiny_moe", ["parallel.expert_model_parallel_size=1"]),
    "moe_tp2_ep2_sp": ("tiny_moe", []),
}
# The MoE aux loss is per rank (a sequence shard under SP), so it differs from TP=1 at ~1e-4; the exact
# comparisons switch it off. Routing, the shared expert and the expert-bias update stay on.
COMMON = ["mtp.num_heads=2", "model.moe.load_balancing_type=none"]
# Models whose parameters are counted against config/params.py: (preset, overrides on top of SINGLE).
COUNT_CASES = {
    "dense": ("tiny_dense", []),
    "dense_tied_no_qknorm": ("tiny_dense", ["model.tie_embeddings=true", "model.qk_layernorm=false"]),
    "moe": ("tiny_moe", ["model.moe.load_balancing_type=seq_aux_loss"]),
    "moe_all_layers": ("tiny_moe", ["model.moe.layer_freq=1", "model.moe.shared_expert_hidden_size=null"]),
}


def tiny(preset: str, overrides: list[str]):
    return load_config(str(CONFIGS / f"{preset}.yaml"), [*COMMON, *overrides])


# ---------------------------------------------------------------------------------------------------------
# Code that runs inside the spawned ranks.
# ---------------------------------------------------------------------------------------------------------


def _build(cfg):
    """Initialise megatron's groups for `cfg` and build the model with the seeded CPU initialisation."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.model.builder import build_model, padded_vocab_size

    p = cfg.parallel
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
    )
    model_parallel_cuda_manual_seed(SEED)
    vocab = padded_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, p.tensor_model_parallel_size)
    model = build_model(cfg, vocab_size=vocab)
    if cfg.model.moe.num_experts:
        _seeded_weights(model)
    return model


def _seeded_weights(model) -> None:
    """Re-draw every matrix from a seed per (name, global expert index), sharded as megatron shards it.

    megatron's CPU initialisation draws full (unsharded) matrices in build order, so TP does not change
    the weights (the dense layouts rely on that). EP does: each EP rank builds only its experts, which
    shifts the RNG stream for everything built after them. Seeding per parameter name, with the local
    expert index mapped to the global one, makes every MoE layout the same model.
    """
    import re
    import zlib

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    std = model.config.init_method_std
    num_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # norm weights start at one in every layout
        stacked = re.search(r"experts\.weight([12])$", name)
        if stacked is not None:  # GroupedGemmExperts (expert TP 1): each slab drawn as SequentialMLP's expert
            for i in range(param.shape[0]):
                expert = ps.get_expert_model_parallel_rank() * num_local + i
                key = name.replace(stacked.group(0), f"experts.expert{expert}.linear_fc{stacked.group(1)}.weight")
                gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                with torch.no_grad():
                    param[i].copy_(torch.randn(param[i].shape, generator=gen) * std)
            continue
        match = re.search(r"local_experts\.(\d+)\.", name)
        if match is not None:
            expert = ps.get_expert_model_parallel_rank() * num_local + int(match.group(1))
            name = name.replace(match.group(0), f"expert{expert}.")
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))

        def draw(full: torch.Tensor, gen=gen) -> torch.Tensor:
            return full.copy_(torch.randn(full.shape, generator=gen) * std)

        if not getattr(param, "tensor_model_parallel", False):
            with torch.no_grad():
                draw(param)
            continue
        is_expert = not getattr(param, "allreduce", True)
        rank = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()
        world = ps.get_expert_tensor_parallel_world_size() if is_expert else ps.get_tensor_model_parallel_world_size()
        dim, full = param.partition_dim, list(param.shape)
        full[dim] *= world
        _initialize_affine_weight_cpu(
            param,
            full[0],
            full[1],
            param.shape[dim],
            dim,
            draw,
            stride=param.partition_stride,
            rank=rank,
            world_size=world,
            skip_set_tensor_parallel_attributes=True,
        )


def _batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens[:, :-1], position_ids, tokens[:, 1:]


def _train_step(cfg) -> dict:
    """Forward+backward, megatron's finalize_model_grads, one plain SGD step, forward again."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = _build(cfg)
    ddp = DistributedDataParallel(
        config=model.config,
        module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        ),
    )
    tokens, position_ids, labels = _batch()
    ddp.zero_grad_buffer()
    loss0 = ddp(tokens, position_ids, None, labels=labels)
    loss0.mean().backward()

    def norm_grads() -> dict:
        return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters() if "norm" in n}

    before_sync = norm_grads()
    finalize_model_grads([ddp])
    after_sync = norm_grads()
    with torch.no_grad():
        for param in ddp.parameters():
            param.add_(param.main_grad, alpha=-LR)
        loss1 = ddp(tokens, position_ids, None, labels=labels)
        logits = ddp(tokens, position_ids, None)  # [s, b, vocab / tp]
    return {
        "loss0": loss0.detach(),
        "loss1": loss1,
        "logits": logits,
        "before_sync": before_sync,
        "after_sync": after_sync,
    }


def _count(cfg) -> dict:
    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    model = _build(cfg)
    out = model.output_layer.weight
    return {
        "embedding": numel(model.embedding),
        "output_layer": 0 if out is None else out.numel(),
        "decoder": numel(model.decoder),
        "mtp_head": [numel(layer) for layer in model.mtp.layers],
        "total": numel(model),
    }


def _attention_pair() -> dict:
    """megatron's DotProductAttention and SDPAttention built with the same arguments, same inputs."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mtpd_megatron.model.builder import transformer_config
    from mtpd_megatron.model.sdpa_attention import SDPAttention

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    tcfg = transformer_config(tiny("tiny_dense", SINGLE))
    assert (tcfg.num_attention_heads, tcfg.num_query_groups) == (4, 2)
    gen = torch.Generator().manual_seed(3)
    s, b, d = 24, 3, tcfg.kv_channels
    inputs = [torch.randn(s, b, heads, d, generator=gen) for heads in (4, 2, 2)]
    grad_out = torch.randn(s, b, 4 * d, generator=gen)
    results = {}
    for name, cls in (("reference", DotProductAttention), ("sdpa", SDPAttention)):
        module = cls(config=tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        q, k, v = (x.clone().requires_grad_(True) for x in inputs)
        out = module(q, k, v, attention_mask=None)
        out.backward(grad_out)
        results[name] = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return results


def _rank_main_world1() -> dict:
    """Single process: parameter counts, attention equivalence, the TP=1 reference runs, vocab padding."""
    from mtpd_megatron.config.params import padded_vocab
    from mtpd_megatron.model.builder import padded_vocab_size

    counts = {name: _count(tiny(preset, SINGLE + extra)) for name, (preset, extra) in COUNT_CASES.items()}
    references = {kind: _train_step(tiny(f"tiny_{kind}", SINGLE)) for kind in ("dense", "moe")}
    grid = [(v, d, tp) for v in (1, 1000, 50257, 122880) for d in (1, 64, 128) for tp in (1, 2, 4, 8)]
    padding_agrees = all(padded_vocab(*args) == padded_vocab_size(*args) for args in grid)
    return {
        "counts": counts,
        "references": references,
        "attention": _attention_pair(),
        "padding_agrees": padding_agrees,
    }


def _rank_main_world2() -> dict:
    return {name: _train_step(tiny(preset, extra)) for name, (preset, extra) in LAYOUTS.items()}


# ---------------------------------------------------------------------------------------------------------
# Tests (the parent process compares what the ranks returned).
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world1() -> dict:
    return run_distributed(_rank_main_world1, 1)[0]


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_distributed(_rank_main_world2, 2)


@pytest.mark.parametrize("name", sorted(COUNT_CASES))
def test_parameter_formula_matches_built_model(world1, name):
    preset, extra = COUNT_CASES[name]
    built = world1["counts"][name]
    formula = count_parameters(tiny(preset, SINGLE + extra), VOCAB)
    assert built["embedding"] == formula["embedding"]
    assert built["output_layer"] == formula["output_layer"]
    assert built["decoder"] == formula["decoder"]
    assert built["mtp_head"] == [formula["mtp_head"]] * 2
    assert built["total"] == formula["total"]


def test_config_padding_rule_is_the_builders(world1):
    assert world1["padding_agrees"]


def test_sdpa_matches_megatron_reference_attention(world1):
    ref, sdpa = world1["attention"]["reference"], world1["attention"]["sdpa"]
    for key in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(sdpa[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
    assert ref["dk"].abs().sum() > 0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_reproduces_single_process_training_step(world1, world2, layout):
    kind = "moe" if layout.startswith("moe") else "dense"
    ref = world1["references"][kind]
    assert torch.isfinite(ref["loss0"]).all() and torch.isfinite(ref["loss1"]).all()
    assert ref["loss1"].mean() < ref["loss0"].mean() - 1e-3  # the SGD step did something
    for rank in world2:
        run = rank[layout]
        for key in ("loss0", "loss1"):
            torch.testing.assert_close(run[key], ref[key], atol=1e-5, rtol=0, msg=f"{layout} {key}")
    # Ranks agree exactly: TP ranks share one vocab-parallel loss, DP replicas saw the same batch.
    assert torch.equal(world2[0][layout]["loss0"], world2[1][layout]["loss0"])
    assert torch.equal(world2[0][layout]["loss1"], world2[1][layout]["loss1"])


def test_sequence_parallel_norm_matches_without_sp(world2):
    """TP=2 with SP on vs off: same logits, and after finalize_model_grads the same norm weight grads.

    Under SP each rank normalises half of the sequence, so before the all-reduce its norm grads are
    partial; q/k-norm grads are partial over heads with or without SP and are summed in both runs.
    """
    for rank in world2:
        on, off = rank["dense_tp2_sp"], rank["dense_tp2"]
        torch.testing.assert_close(on["logits"], off["logits"], atol=1e-6, rtol=0)
        names = list(off["after_sync"])
        assert any(".enorm." in n for n in names) and any("final_layernorm" in n for n in names)
        for name in names:
            torch.testing.assert_close(on["after_sync"][name], off["after_sync"][name], atol=1e-6, rtol=0, msg=name)
        sp_tagged = [n for n in names if "q_layernorm" not in n and "k_layernorm" not in n]
        still_partial = [
            n for n in sp_tagged if not torch.allclose(on["before_sync"][n], off["after_sync"][n], atol=1e-6)
        ]
        assert still_partial == sp_tagged


def test_compat_layer_refuses_another_megatron_version():
    with pytest.raises(cpu_compat.CompatError) as err:
        cpu_compat.check_version("0.16.1")
    message = str(err.value)
    assert "0.16.1" in message and cpu_compat.PINNED_MEGATRON_CORE in message
    assert f"pip install --no-deps --ignore-requires-python megatron-core=={cpu_compat.PINNED_MEGATRON_CORE}" in message
    cpu_compat.check_version(cpu_compat.PINNED_MEGATRON_CORE)


def test_compat_layer_refuses_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(cpu_compat.CompatError, match="GPU"):
        cpu_compat.enable()
    assert not cpu_compat.is_enabled()
