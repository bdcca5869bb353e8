"""Checkpoints move between GroupedGemmExperts (stacked weights) and megatron's SequentialMLP, optimizer included.

A tiny MoE run trains 5 steps with one experts module and writes iter_4 and iter_5; iter_4 is resumed with the
other module for step 5. The step-5 checkpoint (weights, and the Adam moments that the distributed optimizer
writes per parameter in the fully_reshardable format, keyed by the model's sharded tensors) must equal the
straight run's: the stacked slab and the per-expert tensors are the same global checkpoint tensors, so any
misplaced expert, swapped gate/up half or dropped moment shows up here. Both directions, real CLI, forked
trainer processes; the plain (non-distributed) optimizer too, which maps its state to the same sharded tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_resume_changes import _tensors
from train_helpers import make_data, run, tiny_config, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _moe_config(data, save: Path, backend: str, distributed: bool, **checkpoint) -> dict:
    model = yaml.safe_load((ROOT / "configs/tiny_moe.yaml").read_text())["model"]
    model["moe"]["experts_backend"] = backend
    return tiny_config(
        *data,
        save,
        model=model,
        training={"train_iters": 5},
        parallel={"use_distributed_optimizer": distributed},
        checkpoint={"save": str(save), "keep_last": 0, **checkpoint},
    )


def _train(data, root: Path, backend: str, distributed: bool, resume_from: Path | None = None) -> Path:
    save = root / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        save.mkdir(parents=True)
        shutil.copytree(resume_from / "iter_0000004", save / "iter_0000004")
    cfg = write_config(
        root / "cfg.yaml", _moe_config(data, save, backend, distributed, save_interval=4 if not resume_from else 1)
    )
    args = ["--config", str(cfg)] + (["--resume", "auto"] if resume_from is not None else [])
    [(rc, out, err)] = run(args, fork=True)
    assert rc == 0, err[-2000:]
    return save


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("grouped-ckpt-data"))


@pytest.mark.parametrize(
    "first, then, distributed",
    [("grouped", "sequential", True), ("sequential", "grouped", True), ("grouped", "sequential", False)],
    ids=["grouped-to-sequential", "sequential-to-grouped", "grouped-to-sequential-plain-optimizer"],
)
def test_resume_with_the_other_experts_module_continues_exactly(data, tmp_path, first, then, distributed):
    straight = _train(data, tmp_path / "straight", first, distributed)
    resumed = _train(data, tmp_path / "resumed", then, distributed, resume_from=straight)
    a, b = _tensors(straight / "iter_0000005"), _tensors(resumed / "iter_0000005")
    experts = [k for k in a if "mlp.experts.experts.linear_fc" in k]
    moments = [k for k in experts if k.startswith("optimizer.state.exp_avg")]
    assert experts and moments, sorted(a)[:20]
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    start = _tensors(straight / "iter_0000004")
    moved = [k for k in experts if not torch.equal(start[k], a[k])]
    assert moved  # step 5 changed the experts: the comparison above is not of untouched weights
