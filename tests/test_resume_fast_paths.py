"""Resuming a run that uses the torch-native fast paths (the presets switch them on): fused AdamW
(`training.fused_adam`), foreach grad norm/clip/copies (`training.foreach_multi_tensor`) and the shared teacher
logits (`mtp.mtpd.share_teacher_logits`), through the real CLI with the distributed optimizer.

A straight run writes iter_4 and iter_5; iter_4 resumed with the same config must write an iter_5 equal to
the straight run's, weights and Adam moments bit for bit (CPU, fp32): the fused optimizer's state (moments,
step) goes through megatron's fully_reshardable checkpoint and comes back. A resume that lost the moments or
restarted the step count (bias correction of step 1) changes every weight.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_resume_changes import _tensors
from train_helpers import make_data, run, tiny_config, write_config

pytestmark = pytest.mark.slow

FAST = {"fused_adam": True, "foreach_multi_tensor": True, "train_iters": 5}


def _config(data, root: Path, save: Path, interval: int) -> Path:
    cfg = tiny_config(
        *data,
        save,
        training=FAST,
        mtp={"num_heads": 2, "mtpd": {"topn": 64, "share_teacher_logits": True}},
        parallel={"use_distributed_optimizer": True},
        checkpoint={"save": str(save), "save_interval": interval, "keep_last": 0},
    )
    return write_config(root / "cfg.yaml", cfg)


def test_resume_with_fused_adam_foreach_and_shared_teacher_is_bitwise(tmp_path):
    data = make_data(tmp_path / "data")
    straight = tmp_path / "straight" / "ckpt"
    straight.parent.mkdir()
    [(rc, out, err)] = run(["--config", str(_config(data, straight.parent, straight, 4))], fork=True)
    assert rc == 0, err[-2000:]
    resumed = tmp_path / "resumed" / "ckpt"
    resumed.mkdir(parents=True)
    shutil.copytree(straight / "iter_0000004", resumed / "iter_0000004")
    cfg = _config(data, resumed.parent, resumed, 1)
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    assert rc == 0, err[-2000:]
    assert f"resumed from {resumed / 'iter_0000004'} at iteration 4" in out
    a, b = _tensors(straight / "iter_0000005"), _tensors(resumed / "iter_0000005")
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer.state.exp_avg.") for k in a)
    for key, value in a.items():
        assert torch.equal(b[key], value), key
    start = _tensors(straight / "iter_0000004")
    assert any(not torch.equal(start[k], a[k]) for k in a if not k.startswith("optimizer."))
