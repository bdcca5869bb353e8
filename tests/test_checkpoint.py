"""Checkpoint contract of `python -m mtpd_megatron.train`, through the real CLI and real signals.

* SIGTERM mid-run: the step finishes, a checkpoint is saved, exit 75; `--resume auto` then reproduces the
  uninterrupted run's losses bit for bit (weights, AdamW state, LR schedule, data position, RNG).
* SIGKILL inside a save: the half-written `iter_N.tmp` is ignored, a newest-but-truncated checkpoint is
  skipped, and `--resume auto` continues from the previous complete one, again bit for bit.
* A TP2 checkpoint resumed at TP1 continues with the same losses (1e-5); a checkpoint of another model and
  missing/corrupt data or a wrong tokenizer are one-line errors with exit code 2 and nothing written.
* Integrity: every file has a SHA-256 digest in megatron's integrity.json; flipped or zeroed blocks make
  `--resume auto` fall back to the previous checkpoint with one line (a named one is an exit-2 error).
* kill -9 at random moments through 10 save/resume cycles (sync and async saves): every resume continues
  from a complete, digest-verified checkpoint and the loss curve equals the uninterrupted run's.

The trainers are forked from the fork server (train_helpers.fork_server): real processes, signals and exit
codes, without paying the interpreter's start-up for each of the ~40 runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from train_helpers import make_data, read_metrics, run, signal_when, start, tiny_config, wait, write_config

from mtpd_megatron.checkpoint.layout import TRACKER_FILE, complete_checkpoints, verify

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
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    assert rc == 0, err
    return read_metrics(root / "ckpt" / "tensorboard")


def _losses(records: dict) -> dict:
    return {step: r["loss"] for step, r in records.items()}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigterm_saves_exits_75_and_resume_is_bitwise(data, straight, tmp_path, async_save):
    save = tmp_path / "ckpt"
    # Periodic saves before the signal (so the writer's machinery exists when SIGTERM hits every process);
    # keep_last=2 prunes older ones.
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": ITERS},
            checkpoint={"save": str(save), "save_interval": 2, "keep_last": 2, "async_save": async_save},
        ),
    )
    ranks = start(["--config", str(cfg)], fork=True)
    signal_when(ranks, "step 4/")  # to every process of the rank, as Slurm does on preemption
    [(rc, out, err)] = wait(ranks)
    assert rc == 75, err
    stopped = int((save / TRACKER_FILE).read_text())
    assert 4 <= stopped < ITERS and verify(save / f"iter_{stopped:07d}") is None
    assert max(read_metrics(save / "tensorboard")) == stopped  # the step in flight finished, no more
    assert len(complete_checkpoints(save)) == 2

    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    assert rc == 0, err
    assert f"resumed from {save / f'iter_{stopped:07d}'}" in out
    assert _losses(read_metrics(save / "tensorboard")) == _losses(straight)  # bitwise, every step


def test_sigkill_mid_save_keeps_previous_checkpoint(data, straight, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": ITERS},
            checkpoint={"save": str(save), "save_interval": 4, "keep_last": 0},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)], prelude=KILL_MID_SAVE, fork=True)
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

    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    assert rc == 0, err
    assert f"skipping {corrupt}" in out and f"resumed from {save / 'iter_0000004'}" in out
    assert not partial.exists()  # leftovers are cleaned at start-up
    resumed = _losses(read_metrics(save / "tensorboard"))
    assert resumed == _losses(straight)


@pytest.fixture(scope="module")
def tp2_run(data, tmp_path_factory) -> tuple[Path, dict]:
    """2 ranks at TP2, 8 steps, checkpoint at step 4: (checkpoint dir, losses)."""
    root = tmp_path_factory.mktemp("tp2")
    cfg = write_config(
        root / "cfg.yaml",
        tiny_config(
            *data,
            root / "ckpt",
            parallel={"tensor_model_parallel_size": 2},
            training={"train_iters": 8},
            checkpoint={"save": str(root / "ckpt"), "save_interval": 4, "keep_last": 0},
        ),
    )
    results = run(["--config", str(cfg)], world=2, fork=True)
    assert [r[0] for r in results] == [0, 0], results[0][2]
    return root / "ckpt" / "iter_0000004", _losses(read_metrics(root / "ckpt" / "tensorboard"))


def test_tp2_checkpoint_resumes_at_tp1(data, tp2_run, tmp_path):
    ckpt, tp2_losses = tp2_run
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(*data, tmp_path / "ckpt", training={"train_iters": 8}))
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", str(ckpt)], fork=True)
    assert rc == 0, err
    assert "layout changed" in out
    tp1_losses = _losses(read_metrics(tmp_path / "ckpt" / "tensorboard"))
    assert sorted(tp1_losses) == [5, 6, 7, 8]
    for step, loss in tp1_losses.items():
        assert loss == pytest.approx(tp2_losses[step], abs=1e-5), step


def _one_line_error(rc: int, err: str, *needles: str) -> None:  # exit 2, one line
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mtpd-train: error: "), err
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
        procs[name] = start(["--config", str(cfg), "--resume", resume, *overrides], fork=True)
    for name, plist in procs.items():
        [(rc, out, err)] = wait(plist)
        _one_line_error(rc, err, *cases[name][2])
        assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name}: something was written"


# ---------------------------------------------------------------------------------------------------------
# Integrity: digests of every file (megatron's integrity.json), verified before a resume; fallbacks
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory) -> tuple[Path, dict]:
    """iter_4 and iter_8 of an 8-step run (forked trainer) and its losses."""
    root = tmp_path_factory.mktemp("two")
    save = root / "ckpt"
    cfg = tiny_config(
        *data, save, training={"train_iters": 8}, checkpoint={"save": str(save), "save_interval": 4, "keep_last": 0}
    )
    write_config(root / "cfg.yaml", cfg)
    [(rc, out, err)] = run(["--config", str(root / "cfg.yaml")], fork=True)
    assert rc == 0, err
    return save, _losses(read_metrics(save / "tensorboard"))


def _copy(src: Path, dst: Path, data) -> Path:
    shutil.copytree(src, dst / "ckpt")
    cfg = tiny_config(
        *data,
        dst / "ckpt",
        training={"train_iters": 8},
        checkpoint={"save": str(dst / "ckpt"), "save_interval": 4, "keep_last": 0},
    )
    return write_config(dst / "cfg.yaml", cfg)


def _flip(path: Path, offset: int, length: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_integrity_manifest_is_megatrons_and_catches_flipped_bytes(two_checkpoints, tmp_path):
    from megatron.core.dist_checkpointing import validation
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from mtpd_megatron.checkpoint import layout

    assert (layout.INTEGRITY_FILE, layout.INTEGRITY_ALGORITHM) == (
        validation.INTEGRITY_FNAME,
        validation._HASH_ALGORITHM,
    )
    save, _ = two_checkpoints
    ckpt = shutil.copytree(save / "iter_0000008", tmp_path / "iter_0000008")
    listed = json.loads((ckpt / layout.INTEGRITY_FILE).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in ckpt.iterdir() if p.name != layout.INTEGRITY_FILE)
    validation.verify_integrity_manifest(str(ckpt))  # megatron's own check accepts ours
    shard = next(ckpt.glob("*.distcp"))
    _flip(shard, shard.stat().st_size // 2)
    assert verify(ckpt) is None  # sizes and metadata still fine: only the digest sees it
    assert f"{shard.name} does not match its sha256 checksum" in verify(ckpt, checksums=True)
    with pytest.raises(CheckpointingException, match="hash mismatch"):
        validation.verify_integrity_manifest(str(ckpt))


def test_corrupt_newest_checkpoint_falls_back_with_one_line(data, two_checkpoints, tmp_path):
    """4 KiB flipped inside a shard (digest mismatch), and a zeroed shard of the same size in a checkpoint
    without a manifest (torch DCP raises CheckpointException, a BaseException): both fall back to iter_4,
    and the resumed run's losses equal the uninterrupted run's."""
    save, losses = two_checkpoints
    flipped = _copy(save, tmp_path / "flipped", data)
    _flip(next((tmp_path / "flipped" / "ckpt" / "iter_0000008").glob("*.distcp")), 1 << 20)
    zeroed = _copy(save, tmp_path / "zeroed", data)
    for ckpt in (tmp_path / "zeroed" / "ckpt").glob("iter_*"):
        (ckpt / "integrity.json").unlink()  # as written before checksums existed
    shard = next((tmp_path / "zeroed" / "ckpt" / "iter_0000008").glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))
    for cfg, why in ((flipped, "does not match its sha256 checksum"), (zeroed, "could not be loaded (UnpicklingError")):
        ckpt = cfg.parent / "ckpt"
        [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
        assert rc == 0, err
        skipped = [line for line in out.splitlines() if "skipping" in line]
        assert len(skipped) == 1 and str(ckpt / "iter_0000008") in skipped[0] and why in skipped[0], out
        assert f"resumed from {ckpt / 'iter_0000004'} at iteration 4" in out
        resumed = _losses(read_metrics(ckpt / "tensorboard"))
        assert resumed == losses  # steps 5..8 again, bit for bit
        assert verify(ckpt / "iter_0000008", checksums=True) is None  # the damaged one was replaced


def test_damaged_checkpoints_that_cannot_fall_back_are_one_line_errors(data, two_checkpoints, tmp_path):
    save, _ = two_checkpoints
    cfg = _copy(save, tmp_path, data)
    ckpt = tmp_path / "ckpt"
    for it in ("iter_0000004", "iter_0000008"):
        _flip(next((ckpt / it).glob("*.distcp")), 4096)
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", str(ckpt / "iter_0000008")], fork=True)
    _one_line_error(
        rc,
        err,
        f"--resume {ckpt / 'iter_0000008'}: the integrity check failed",
        "sha256 checksum",
        "pick another checkpoint",
    )
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    _one_line_error(rc, err, f"{ckpt} holds checkpoints but none is complete and intact", "--resume none")
    assert out.count("skipping") == 2
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before  # nothing written or removed


# ---------------------------------------------------------------------------------------------------------
# kill -9 at random moments, over and over
# ---------------------------------------------------------------------------------------------------------

CYCLE_ITERS = 40


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight30")
    cfg = write_config(root / "cfg.yaml", tiny_config(*data, root / "ckpt", training={"train_iters": CYCLE_ITERS}))
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    assert rc == 0, err
    return _losses(read_metrics(root / "ckpt" / "tensorboard"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_at_random_moments_resumes_from_verified_checkpoints(data, straight_run, tmp_path, async_save):
    """10 cycles: start (resume auto), wait for training, SIGKILL the trainer process at a random moment
    (a save every step, so most kills land in or around one; the async writer must die with it). After each
    kill every published checkpoint passes its digests, and the next run resumes from the newest of them.
    Finally the run completes and its loss curve equals the uninterrupted run's bit for bit."""
    import random

    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": CYCLE_ITERS},
            checkpoint={"save": str(save), "save_interval": 1, "keep_last": 2, "async_save": async_save},
        ),
    )
    rng = random.Random(20261202 + async_save)
    expected, mid_save, kills, step_s = None, 0, 0, 0.2
    for _cycle in range(10):
        ranks = start(["--config", str(cfg), "--resume", "auto"], fork=True)
        # The moment: after 1 or 2 new steps, then a random part of a step (measured, so that every cycle
        # kills the run before it ends whatever the machine's speed).
        wanted, seen, deadline = rng.choice([1, 2]), [], time.time() + 120
        while len(seen) < wanted and ranks[0].proc.poll() is None:
            count = ranks[0].out_path.read_text().count("] step ")
            if count > len(seen):
                seen += [time.time()] * (count - len(seen))
            assert time.time() < deadline, ranks[0].out_path.read_text()
            time.sleep(0.01)
        if len(seen) >= 2:
            step_s = seen[1] - seen[0]
        time.sleep(rng.uniform(0.0, step_s))
        os.kill(ranks[0].proc.pid, signal.SIGKILL)  # the trainer only: its forked writer must not outlive it
        [(rc, out, err)] = wait(ranks)
        if expected is not None:
            assert f"resumed from {expected} at iteration" in out and "(integrity verified)" in out, out
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, err
        kills += 1
        mid_save += bool(list(save.glob("iter_*.tmp")))
        published = complete_checkpoints(save)
        for ckpt in published:
            assert verify(ckpt, checksums=True) is None, ckpt
        expected = published[-1] if published else None
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "auto"], fork=True)
    assert rc == 0, err
    if expected is not None:
        assert f"resumed from {expected} at iteration" in out
    print(f"kill -9 cycles ({'async' if async_save else 'sync'}): {kills} kills, {mid_save} inside a save")
    assert kills == 10 and mid_save >= 1, (kills, mid_save)
    assert _losses(read_metrics(save / "tensorboard")) == straight_run
