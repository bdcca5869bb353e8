"""Looped extension through the real CLI: copy-init, frozen main model and old heads, optimizer state only for
trainable parameters, stage-aware resume (also across TP), and a chain that never re-runs a finished stage."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests import train_helpers as th

STAGE_ITERS = 6


def _config(tmp: Path, data: Path, **overrides) -> Path:
    tok, prefix = th.make_data(data)
    cfg = th.tiny_config(
        tok,
        prefix,
        tmp / "ckpt",
        looped={
            "stages": [
                {"heads": 1, "train_iters": STAGE_ITERS},
                {"heads": 2, "train_iters": STAGE_ITERS, "init": "copy", "lr": 1e-2},
            ]
        },
    )
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    cfg["logging"]["tensorboard_dir"] = str(tmp / "tb")
    return th.write_config(tmp / "looped.yaml", cfg)


def _start(args: list[str], world: int = 1) -> list:
    """`python -m mtpd_megatron.looped ARGS` as `world` rank processes (srun style, as the trainer tests)."""
    return th.start(args, world, module="mtpd_megatron.looped")


def _run(args: list[str], world: int = 1):
    results = th.wait(_start(args, world), timeout=300)
    for code, out, err in results:
        assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return results


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a torch_dist checkpoint, read on one process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt)).read_metadata()
    wanted = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer") and "_extra_state" not in k
    }
    load(wanted, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return wanted


def _optimizer_keys(ckpt: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("optimizer")]


def _head(key: str):
    import re

    m = re.search(r"mtp\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("looped_data")


def test_chain_copy_init_freeze_and_no_rerun(tmp_path, data_dir):
    cfg = _config(tmp_path, data_dir)
    out = _run(["run-chain", "--config", str(cfg)])[0][1]
    stage0 = tmp_path / "ckpt" / "stage_0_heads_1"
    stage1 = tmp_path / "ckpt" / "stage_1_heads_2"
    final0, init1, final1 = stage0 / "iter_0000006", stage1 / "iter_0000000", stage1 / "iter_0000006"
    for path in (final0, init1, final1):
        assert path.is_dir(), f"{path} missing\n{out[-2000:]}"
    assert out.index("stage0") < out.index("stage1")

    w0, wi, w1 = _weights(final0), _weights(init1), _weights(final1)
    # Extension: the new head equals its source head bitwise; the rest equals the previous stage.
    new_keys = [k for k in wi if _head(k) == 1]
    assert new_keys
    for key in new_keys:
        assert torch.equal(wi[key], wi[key.replace("mtp.layers.1.", "mtp.layers.0.")]), key
    for key, value in w0.items():
        assert torch.equal(wi[key], value), key
    # Training the stage: main model (the teacher) and head 1 (old) bitwise unchanged; the new head moved.
    for key, value in wi.items():
        if _head(key) == 1:
            continue
        assert torch.equal(w1[key], value), f"frozen parameter {key} changed"
    assert any(not torch.equal(w1[k], wi[k]) for k in new_keys), "the new head did not train"
    # Optimizer state exists only for the trainable parameters (the new head).
    opt = [k for k in _optimizer_keys(final1) if "exp_avg" in k or "param" in k]
    assert opt and all(_head(k) == 1 for k in opt), opt[:5]

    # The training-free extension (iteration 0) evaluates next to the trained stage.
    report = tmp_path / "acceptance.json"
    done = subprocess.run(
        [
            th.PYTHON,
            "tools/eval_acceptance.py",
            "--ckpt",
            str(init1),
            "--ckpt",
            str(final1),
            "--split",
            "valid",
            "--num-samples",
            "8",
            "--out",
            str(report),
        ],
        cwd=th.ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    import json

    evaluated = json.loads(report.read_text())["checkpoints"]
    assert [e["iteration"] for e in evaluated] == [0, STAGE_ITERS]
    assert all(len(e["a"]) == 2 for e in evaluated)

    # Re-running the chain does nothing.
    before = sorted(p.name for p in stage1.iterdir()), sorted(p.name for p in stage0.iterdir())
    again = _run(["run-chain", "--config", str(cfg)])[0][1]
    assert "stage 0 already complete" in again and "stage 1 already complete" in again
    assert (sorted(p.name for p in stage1.iterdir()), sorted(p.name for p in stage0.iterdir())) == before
    status = subprocess.run(
        [th.PYTHON, "-m", "mtpd_megatron.looped", "status", "--config", str(cfg), "--stage", "1"],
        cwd=th.ROOT,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stdout + status.stderr


def test_resume_mid_stage_equals_straight_run_and_tp2_to_tp1(tmp_path, data_dir):
    straight = tmp_path / "straight"
    straight.mkdir()
    cfg = _config(straight, data_dir)
    _run(["run-stage", "--config", str(cfg), "--stage", "0"])
    _run(["run-stage", "--config", str(cfg), "--stage", "1"])
    ref = th.read_metrics(straight / "tb" / "stage_1")

    # Same stage 0 (copied), then stage 1 extended at TP2, interrupted after step 3, resumed at TP1.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    cfg2 = _config(resumed, data_dir)
    import shutil

    shutil.copytree(straight / "ckpt" / "stage_0_heads_1", resumed / "ckpt" / "stage_0_heads_1")
    tp2 = ["run-stage", "--config", str(cfg2), "--stage", "1", "parallel.tensor_model_parallel_size=2"]
    procs = _start(tp2, world=2)
    th.signal_when(procs, "step 3/", sig=signal.SIGTERM)
    codes = [code for code, _, _ in th.wait(procs)]
    assert codes == [75, 75], codes
    _run(["run-stage", "--config", str(cfg2), "--stage", "1"])
    got = th.read_metrics(resumed / "tb" / "stage_1")
    assert sorted(got) == sorted(ref)
    for step, record in ref.items():
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6), step
        assert got[step]["mtp2/ce"] == pytest.approx(record["mtp2/ce"], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"lr": -1}, "looped.stages[1].lr=-1.0: must be > 0"),
        ({"lr_schedule": "linear"}, "looped.stages[1].lr_schedule='linear': must be one of cosine, wsd, constant"),
        ({"lr": 1e-4}, "training.min_lr=0.0003: exceeds looped.stages[1].lr=0.0001"),
        ({"lr_warmup_iters": 50}, "looped.stages[1].lr_warmup_iters=50: exceeds looped.stages[1].train_iters=6"),
    ],
)
def test_every_stage_is_validated_before_stage_0_trains(tmp_path, data_dir, stage, message):
    """A bad later stage is one line naming the stage's field, before stage 0 writes anything."""
    tok, prefix = th.make_data(data_dir)
    cfg = th.tiny_config(
        tok,
        prefix,
        tmp_path / "ckpt",
        looped={
            "stages": [{"heads": 1, "train_iters": STAGE_ITERS}, {"heads": 2, "train_iters": STAGE_ITERS, **stage}]
        },
    )
    path = th.write_config(tmp_path / "looped.yaml", cfg)
    for command in (["run-chain"], ["run-stage", "--stage", "0"]):
        [(rc, out, err)] = th.run([*command, "--config", str(path)], fork=True, module="mtpd_megatron.looped")
        assert rc == 2 and err.strip().splitlines() == [f"python -m mtpd_megatron.looped: error: {message}"], (
            rc,
            out,
            err,
        )
    assert not (tmp_path / "ckpt").exists()
