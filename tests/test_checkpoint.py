"""Checkpoint contract of `python -m mtpd_megatron.train`, through the real CLI and real signals.

* SIGTERM mid-run: the step finishes, a checkpoint is saved, exit 75; `--resume auto` then reproduces the
  uninterrupted run's losses bit for bit (weights, AdamW state, LR schedule, data position, RNG).
* SIGKILL inside a save: the half-written `iter_N.tmp` is ignored, a newest-but-truncated checkpoint is
  skipped, and `--resume auto` continues from the previous complete one, again bit for bit.
* A TP2 checkpoint resumed at TP1 continues with the same losses (1e-5); a checkpoint of another model and
  missing/corrupt data or a wrong tokenizer are one-line errors with exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from mtpd_megatron.checkpoint.layout import TRACKER_FILE, complete_checkpoints, verify
from train_helpers import make_data, read_metrics, run, signal_when, start, tiny_config, wait, write_config

pytestmark = pytest.mark.slow

ITERS = 16
KILL_AT = 8
# Runs in every rank before main(): SIGKILL this process when torch_dist has written the shards of
# iteration KILL_AT and is about to write the global .metadata (i.e. in the middle of the save).
KILL_MID_SAVE = f"""
import os, signal
import mtpd_megatron
from megatron.core.dist_checkpointing.strategies import filesystem_async as _fa
_finish = _fa.FileSystemWriterAsync.finish
def _finish_or_die(self, metadata, results):
    if "iter_{KILL_AT:07d}" in str(self.checkpoint_id):
        os.kill(os.getpid(), signal.SIGKILL)
    return _finish(self, metadata, results)
_fa.FileSystemWriterAsync.finish = _finish_or_die
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_data(tmp_path_factory.mktemp("ckpt-data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    """An uninterrupted 1-rank run of ITERS steps: the reference loss sequence."""
    root = tmp_path_factory.mktemp("straight")
    cfg = write_config(root / "cfg.yaml", tiny_config(*data, root / "ckpt", training={"train_iters": ITERS}))
    [(rc, out, err)] = run(["--config", str(cfg)])
    assert rc == 0, err
    return read_metrics(root / "ckpt" / "tensorboard")


def _losses(records: dict) -> dict:
    return {step: r["loss"] for step, r in records.items()}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigterm_saves_exits_75_and_resume_is_bitwise(data, straight, tmp_path, async_save):
    save = tmp_path / "ckpt"
    # Periodic saves before the signal (so the writer's machinery exists when SIGTERM hits every process);
    # keep_last=2 prunes older ones.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        *data, save, training={"train_iters": ITERS}, checkpoint={"save": str(save), "save_interval": 2,
                                                                  "keep_last": 2, "async_save": async_save}))
    ranks = start(["--config", str(cfg)])
    signal_when(ranks, "step 4/")  # to every process of the rank, as Slurm does on preemption
    [(rc, out, err)] = wait(ranks)
    assert rc == 75, err
    stopped = int((save / TRACKER_FILE).read_text())
    assert 4 <= stopped < ITERS and verify(save / f"iter_{stopped:07d}") is None
    assert max(read_metrics(save / "tensorboard")) == stopped  # the step in flight finished, no more
    assert len(complete_checkpoints(save)) == 2

    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"])
    assert rc == 0, err
    assert f"resumed from {save / f'iter_{stopped:07d}'}" in out
    assert _losses(read_metrics(save / "tensorboard")) == _losses(straight)  # bitwise, every step


def test_sigkill_mid_save_keeps_previous_checkpoint(data, straight, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        *data, save, training={"train_iters": ITERS}, checkpoint={"save": str(save), "save_interval": 4,
                                                                  "keep_last": 0}))
    [(rc, out, err)] = run(["--config", str(cfg)], prelude=KILL_MID_SAVE)
    assert rc == -signal.SIGKILL, err
    partial = save / f"iter_{KILL_AT:07d}.tmp"
    assert partial.is_dir() and any(partial.glob("*.distcp")) and not (save / f"iter_{KILL_AT:07d}").exists()
    assert (save / TRACKER_FILE).read_text().strip() == "4"
    assert verify(save / "iter_0000004") is None

    # A newer checkpoint whose shard file got truncated (e.g. a full disk) must be skipped too.
    corrupt = save / "iter_0000012"
    shutil.copytree(save / "iter_0000004", corrupt)
    meta = json.loads((corrupt / "mtpd_checkpoint.json").read_text())
    (corrupt / "mtpd_checkpoint.json").write_text(json.dumps({**meta, "iteration": 12}))
    shard = next(corrupt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert verify(corrupt) is not None

    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"])
    assert rc == 0, err
    assert f"skipping {corrupt}" in out and f"resumed from {save / 'iter_0000004'}" in out
    assert not partial.exists()  # leftovers are cleaned at start-up
    resumed = _losses(read_metrics(save / "tensorboard"))
    assert resumed == _losses(straight)


@pytest.fixture(scope="module")
def tp2_run(data, tmp_path_factory) -> tuple[Path, dict]:
    """2 ranks at TP2, 8 steps, checkpoint at step 4: (checkpoint dir, losses)."""
    root = tmp_path_factory.mktemp("tp2")
    cfg = write_config(root / "cfg.yaml", tiny_config(
        *data, root / "ckpt", parallel={"tensor_model_parallel_size": 2}, training={"train_iters": 8},
        checkpoint={"save": str(root / "ckpt"), "save_interval": 4, "keep_last": 0}))
    results = run(["--config", str(cfg)], world=2)
    assert [r[0] for r in results] == [0, 0], results[0][2]
    return root / "ckpt" / "iter_0000004", _losses(read_metrics(root / "ckpt" / "tensorboard"))


def test_tp2_checkpoint_resumes_at_tp1(data, tp2_run, tmp_path):
    ckpt, tp2_losses = tp2_run
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(*data, tmp_path / "ckpt", training={"train_iters": 8}))
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", str(ckpt)])
    assert rc == 0, err
    assert "layout changed" in out
    tp1_losses = _losses(read_metrics(tmp_path / "ckpt" / "tensorboard"))
    assert sorted(tp1_losses) == [5, 6, 7, 8]
    for step, loss in tp1_losses.items():
        assert loss == pytest.approx(tp2_losses[step], abs=1e-5), step


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_user_errors_exit_2_with_one_line(data, tp2_run, tmp_path):
    tok, prefix = data
    corrupt = tmp_path / "corrupt_text_document"
    shutil.copy(prefix.with_suffix(".idx"), corrupt.with_suffix(".idx"))
    corrupt.with_suffix(".bin").write_bytes(prefix.with_suffix(".bin").read_bytes()[:1000])
    from mtpd_megatron.data.tokenizer import train_tokenizer

    small_tok = train_tokenizer([prefix.parent / "corpus.jsonl"], tmp_path / "small_tok", vocab_size=300)
    ckpt, _ = tp2_run
    cases = {  # name: (overrides, resume, words the error line must contain)
        "other model": (["model.hidden_size=32"], str(ckpt), ("belongs to another model", "model.hidden_size")),
        "missing data": ([f"data.paths=[{tmp_path / 'nope'}]"], "none", (str(tmp_path / "nope"),)),
        "corrupt data": ([f"data.paths=[{corrupt}]"], "none", (str(corrupt),)),
        "wrong tokenizer": ([f"data.tokenizer={small_tok}"], "none", ("tokenizer has only",)),
    }
    procs = {}
    for name, (overrides, resume, _) in cases.items():
        save = tmp_path / name.replace(" ", "_")
        cfg = write_config(tmp_path / f"{save.name}.yaml", tiny_config(tok, prefix, save))
        procs[name] = start(["--config", str(cfg), "--resume", resume, *overrides])
    for name, plist in procs.items():
        [(rc, out, err)] = wait(plist)
        _one_line_error(rc, err, *cases[name][2])
        assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name}: something was written"
