"""Foundation acceptance: one TP1/EP1 torch_dist checkpoint, resumed in other parallel layouts, trains alike.

A single process trains tiny dense and tiny MoE models (MoE aux loss coefficient 0: the aux loss is computed
per rank and is not layout-invariant) for 2 steps, saves, and records the losses of 3 more steps. Two gloo
ranks then load each checkpoint into TP2, TP2+SP, DP2, PP2 (dense) and EP2, TP2+EP2+SP (MoE) layouts and must
reproduce those 3 losses to 1e-5 — weights, AdamW moments, LR schedule and data position all resharded by
torch_dist through the Trainer's own checkpoint manager.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mtpd_megatron.testing.distributed import run_distributed
from train_helpers import make_data, tiny_config

STEPS = 3
SAVED_AT = 2

LAYOUTS = {
    "dense": [
        {"tensor_model_parallel_size": 2},
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        {},  # world 2 at TP1: DP2 (the global batch is split over two ranks)
        {"pipeline_model_parallel_size": 2},  # 1F1B schedule, MTP heads on the last stage
    ],
    "moe": [
        {"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1},
        {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
         "sequence_parallel": True},
    ],
}


def _config(kind: str, data: Path, save: Path, parallel: dict) -> dict:
    tok, prefix = data / "tok" / "tokenizer.json", data / "corpus_text_document"
    model = {}
    if kind == "moe":
        model = {"moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 64, "aux_loss_coeff": 0.0,
                         "load_balancing_type": "none"}}
    cfg = tiny_config(tok, prefix, save, parallel=parallel,
                      training={"train_iters": SAVED_AT + STEPS, "global_batch_size": 4, "micro_batch_size": 1})
    cfg["model"].update(model)
    return cfg


def _train(cfg_dict: dict, resume: str, steps: int, save: bool) -> list[float]:
    """On every rank: (re)build megatron's groups for this layout, build a Trainer, run `steps` steps."""
    import torch
    from megatron.core import parallel_state

    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.data import load_tokenizer
    from mtpd_megatron.parallel import launch
    from mtpd_megatron.trainer import Trainer

    cfg = config_from_dict(copy.deepcopy(cfg_dict))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    launch.init_distributed(cfg, launch.read_env())
    trainer = Trainer(cfg, load_tokenizer(cfg.data.tokenizer), torch.device("cpu"), resume=resume)
    losses = [trainer.train_step().loss for _ in range(steps)]
    if save:
        trainer.save()
    trainer.close()
    return losses


def _reference(cfgs: dict) -> dict:
    out = {}
    for kind, cfg in cfgs.items():
        _train(cfg, "none", SAVED_AT, save=True)
        out[kind] = _train(cfg, "auto", STEPS, save=False)
    return out


def _layouts(cfgs: dict) -> dict:
    return {key: _train(cfg, resume, STEPS, save=False) for key, (cfg, resume) in cfgs.items()}


@pytest.mark.slow
def test_tp1_checkpoint_trains_alike_in_other_layouts(tmp_path: Path):
    data = tmp_path / "data"
    make_data(data)
    refs = {kind: _config(kind, data, tmp_path / kind, {}) for kind in LAYOUTS}
    expected = run_distributed(_reference, 1, refs)[0]

    runs = {}
    for kind, layouts in LAYOUTS.items():
        ckpt = str(tmp_path / kind / f"iter_{SAVED_AT:07d}")
        for i, parallel in enumerate(layouts):
            runs[f"{kind}:{parallel}"] = (_config(kind, data, tmp_path / f"{kind}-{i}", parallel), ckpt)
    got = run_distributed(_layouts, 2, runs)
    assert got[0] == got[1]  # every rank agrees on the loss (one all-reduce)
    for key, losses in got[0].items():
        kind = key.split(":")[0]
        assert losses == pytest.approx(expected[kind], abs=1e-5), key
