"""Resuming with changed optimisation settings, through the real CLI (forked trainer processes).

A run writes iter_4 and iter_5. Resuming iter_4 with another LR, min LR, warmup, train_iters and weight
decay must (1) keep the optimizer state: the Adam moments written at step 5 equal the original run's bit for
bit (the step-5 gradient depends only on the step-4 weights and the data), (2) follow the new schedule: the
logged LR is the new cosine value, and (3) apply AdamW with the new LR and weight decay and the *continued*
step count: the step-5 weights equal AdamW computed here by hand from iter_4's weights and the step-5 moments.
A reset step count (bias correction of step 1), the old LR or the old weight decay all fail (3).
Both optimizers (distributed and plain), and the distributed -> plain switch; plain -> distributed is a
one-line error.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_data, read_metrics, run, tiny_config, write_config

pytestmark = pytest.mark.slow

CHANGED = {"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_iters": 1, "train_iters": 6, "weight_decay": 0.01}
BETAS, EPS = (0.9, 0.95), 1e-8


def _cosine(step: int, t: dict) -> float:
    """megatron's warmup + cosine (optimizer_param_scheduler.py get_lr), written out."""
    warmup, decay = t["lr_warmup_iters"], max(t["train_iters"], t["lr_warmup_iters"] + 1)
    if warmup and step <= warmup:
        return t["lr"] * step / warmup
    ratio = (step - warmup) / (decay - warmup)
    return t["min_lr"] + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (t["lr"] - t["min_lr"])


def _tensors(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt)).read_metadata()
    wanted = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)
    }
    load(wanted, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return wanted


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("resume-data"))


def _base(data, root: Path, distributed: bool) -> Path:
    save = root / "ckpt"
    cfg = write_config(
        root / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": 5},
            parallel={"use_distributed_optimizer": distributed},
            checkpoint={"save": str(save), "save_interval": 4, "keep_last": 0},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    assert rc == 0, err
    return save


@pytest.fixture(scope="module")
def bases(data, tmp_path_factory) -> dict:
    return {
        kind: _base(data, tmp_path_factory.mktemp(f"base-{kind}"), kind == "distributed")
        for kind in ("distributed", "plain")
    }


def _resume_changed(data, base: Path, root: Path, distributed: bool, **extra):
    """Resume a copy of base/iter_4 with CHANGED settings and save every step; (rc, out, err, save dir)."""
    save = root / "ckpt"
    save.mkdir(parents=True)
    shutil.copytree(base / "iter_0000004", save / "iter_0000004")
    cfg = write_config(
        root / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training=CHANGED,
            parallel={"use_distributed_optimizer": distributed},
            checkpoint={"save": str(save), "save_interval": 1, "keep_last": 0},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    return rc, out, err, save


@pytest.mark.parametrize(
    "base_kind, distributed",
    [("distributed", True), ("plain", False), ("distributed", False)],
    ids=["distributed", "plain", "distributed-to-plain"],
)
def test_changed_lr_schedule_and_weight_decay_keep_the_optimizer_state(data, bases, tmp_path, base_kind, distributed):
    base = bases[base_kind]
    rc, out, err, save = _resume_changed(data, base, tmp_path, distributed)
    assert rc == 0, err
    assert f"resumed from {save / 'iter_0000004'} at iteration 4" in out

    # (1) the moments continue: step 5 of the resumed run equals step 5 of the original run
    moments = _tensors(save / "iter_0000005", "optimizer.state.exp_avg")
    original = _tensors(base / "iter_0000005", "optimizer.state.exp_avg")
    assert moments and sorted(moments) == sorted(original)
    for key, value in moments.items():
        assert torch.equal(value, original[key]), key

    # (2) the logged LR follows the new schedule
    logged = read_metrics(save / "tensorboard")
    assert sorted(logged) == [5, 6]
    for step in (5, 6):
        assert logged[step]["lr"] == pytest.approx(_cosine(step, CHANGED), rel=1e-9), step

    # (3) AdamW by hand: new LR (the value set after step 4), new weight decay, step count 5
    before = _tensors(base / "iter_0000004")
    after = _tensors(save / "iter_0000005")
    lr, wd, step = _cosine(4, CHANGED), CHANGED["weight_decay"], 5
    checked = 0
    for key, p4 in before.items():
        if key.startswith("optimizer.") or p4.dim() < 2 or "embedding" in key or "output_layer" in key:
            continue  # matrices only (weight decay applies; vectors have wd_mult 0)
        m, v = moments[f"optimizer.state.exp_avg.{key}"].double(), moments[f"optimizer.state.exp_avg_sq.{key}"].double()
        denom = (v.sqrt() / math.sqrt(1 - BETAS[1] ** step)) + EPS
        expected = p4.double() * (1 - lr * wd) - lr / (1 - BETAS[0] ** step) * m / denom
        torch.testing.assert_close(after[key].double(), expected, rtol=1e-5, atol=1e-7, msg=key)
        checked += 1
    assert checked >= 6


def test_plain_checkpoint_into_the_distributed_optimizer_is_one_line(data, bases, tmp_path):
    rc, out, err, save = _resume_changed(data, bases["plain"], tmp_path, distributed=True)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mtpd-train: error: "), err
    assert "parallel.use_distributed_optimizer=false" in lines[0] and "plain (non-distributed)" in lines[0]
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000004"]  # nothing written
