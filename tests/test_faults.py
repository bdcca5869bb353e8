"""Faults around the checkpoint directory, through real (forked) trainer processes and real signals:

* the run lock: a second trainer on a directory exits 2 at once naming the holder; a holder that died is
  taken over (same host: at once; another host: after the heartbeat went stale; a requeued Slurm job);
* a save that fails (here: the process's file-size limit, a real EFBIG from the kernel) ends with one line
  and exit 2, the previous checkpoint intact and verified, no half-written directory; sync and async;
* non-finite steps: no checkpoint before the first optimizer update nor while the last step was
  non-finite (a streak never prunes the good ones), on periodic saves, on SIGTERM and at the end.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from train_helpers import make_data, read_metrics, run, signal_when, start, tiny_config, wait, write_config

from mtpd_megatron.checkpoint import lock as run_lock
from mtpd_megatron.checkpoint.layout import TRACKER_FILE, CheckpointError, complete_checkpoints, verify


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("faults-data"))


def _one_line_error(rc: int, err: str, code: int, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert (
        rc == code
        and len(lines) == 1
        and lines[0].startswith(("mtpd-train: error: ", "python -m mtpd_megatron.looped: error: "))
    ), (rc, err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Run lock: the rules, in this process (flock is per open file, so a second RunLock here is a second holder)
# ---------------------------------------------------------------------------------------------------------


def _fake_holder(directory: Path, age_s: float = 0.0, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / run_lock.LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": time.time() - age_s, **holder}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


HOLD = """
import sys, time
from mtpd_megatron.checkpoint.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_lock_rules(tmp_path, monkeypatch):
    import subprocess
    import sys

    from train_helpers import ROOT

    logged = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "a" / "b")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.LockHeld, match=rf"in use by another trainer \(pid {holder.pid} on host "):
            run_lock.RunLock(tmp_path / "a" / "b").acquire()
    finally:
        holder.kill()
        holder.wait()
    first = run_lock.RunLock(tmp_path / "a" / "b", logged.append).acquire()  # its holder is gone
    assert f"taking over the lock of pid {holder.pid}" in logged[-1]
    with pytest.raises(run_lock.LockHeld, match="already in use by this process"):
        run_lock.RunLock(tmp_path / "a" / "b").acquire()
    first.release()
    assert not (tmp_path / "a" / "b" / run_lock.LOCK_FILE).exists()
    fresh = tmp_path / "c" / "d"
    run_lock.RunLock(fresh).acquire().release()
    assert not (tmp_path / "c").exists()  # created for the lock, empty again: removed

    # same host, no flock held: the holder is gone whatever its pid says
    _fake_holder(tmp_path / "same", pid=os.getpid() + 10**6)
    run_lock.RunLock(tmp_path / "same", logged.append).acquire().release()
    assert "its process is gone" in logged[-1]

    # another host: fresh heartbeat holds; a stale one (> STALE_AFTER_S) is taken over
    _fake_holder(tmp_path / "other", host="node-elsewhere", pid=4242)
    with pytest.raises(run_lock.LockHeld, match="pid 4242 on host node-elsewhere"):
        run_lock.RunLock(tmp_path / "other").acquire()
    _fake_holder(tmp_path / "other", run_lock.STALE_AFTER_S + 60, host="node-elsewhere", pid=4242)
    run_lock.RunLock(tmp_path / "other", logged.append).acquire().release()
    assert "no heartbeat" in logged[-1]

    # a requeued Slurm job takes over its previous incarnation's lock at once (its node may be dead)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _fake_holder(tmp_path / "slurm", host="node-dead", pid=9, slurm_job_id="77", slurm_restart_count=0)
    run_lock.RunLock(tmp_path / "slurm", logged.append).acquire().release()
    assert "earlier run of this Slurm job" in logged[-1]
    _fake_holder(tmp_path / "slurm", host="node-b", pid=9, slurm_job_id="78")
    with pytest.raises(run_lock.LockHeld):
        run_lock.RunLock(tmp_path / "slurm").acquire()

    # a path that cannot hold a lock is one CheckpointError line
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create the run lock"):
        run_lock.RunLock(tmp_path / "file" / "ckpt").acquire()


@pytest.mark.slow
def test_second_trainer_exits_2_at_once_and_a_killed_holder_is_taken_over(data, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(*data, save, training={"train_iters": 500}))
    first = start(["--config", str(cfg)], fork=True)
    signal_when(first, "step 2/", sig=0)  # running (signal 0: nothing sent)
    before = sorted(p.name for p in save.iterdir())
    t0 = time.time()
    [(rc, out, err)] = run(["--config", str(cfg), "--resume", "none"], fork=True)
    took = time.time() - t0
    line = _one_line_error(
        rc, err, 2, "is in use by another trainer", f"pid {first[0].proc.pid} on host", str(save / run_lock.LOCK_FILE)
    )
    assert "] step " not in out and took < 30, (took, line)
    assert sorted(p.name for p in save.iterdir()) == before  # the second trainer wrote nothing

    first[0].signal_group(signal.SIGKILL)  # kill -9: the lock file stays behind, naming the dead holder
    [(rc, _, _)] = wait(first)
    assert rc == -signal.SIGKILL and (save / run_lock.LOCK_FILE).exists()
    [(rc, out, err)] = run(["--config", str(cfg), "training.train_iters=2"], fork=True)
    assert rc == 0, err
    assert f"taking over the lock of pid {first[0].proc.pid}" in out and "its process is gone" in out
    assert not (save / run_lock.LOCK_FILE).exists()  # released at exit


# ---------------------------------------------------------------------------------------------------------
# Save failures
# ---------------------------------------------------------------------------------------------------------

# Every process of the run (the forked async writer inherits it) may write files of at most 1 MiB: the
# kernel refuses the 4 MiB shard with EFBIG, as a full disk refuses with ENOSPC (same code path below).
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
"""


def test_save_failures_are_classified():
    from mtpd_megatron.checkpoint.manager import EXIT_IO_ERROR, EXIT_USER_ERROR, classify

    def wrapped(number):
        try:
            try:
                raise OSError(number, os.strerror(number))
            except OSError as e:
                raise RuntimeError(f"Worker failure: {e}") from e
        except RuntimeError as e:
            return e

    for number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
        code, reason = classify(wrapped(number))
        assert code == EXIT_USER_ERROR and "(" in reason, reason
    assert classify(wrapped(errno.EIO))[0] == EXIT_IO_ERROR
    assert classify(RuntimeError("Worker failure: [Errno 28] No space left on device"))[0] == EXIT_USER_ERROR
    # torch's zip writer loses the errno of a short write ("unexpected pos 704 vs 598"): nothing to classify
    assert classify(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")) is None


def test_a_save_failure_without_errno_is_diagnosed(tmp_path, monkeypatch):
    import resource

    from mtpd_megatron.checkpoint.manager import EXIT_USER_ERROR, diagnose_file_system

    assert diagnose_file_system(tmp_path, 4096) is None  # nothing wrong here
    real_statvfs = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 3

    monkeypatch.setattr(os, "statvfs", lambda path: Full(real_statvfs(path)))
    code, reason = diagnose_file_system(tmp_path, 10 << 20)
    assert code == EXIT_USER_ERROR and reason.startswith("no space left on device"), reason
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1 << 20, resource.RLIM_INFINITY))
    code, reason = diagnose_file_system(tmp_path, 10 << 20)
    assert code == EXIT_USER_ERROR and "file-size limit of 1048576 bytes" in reason, reason


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(data, tmp_path, async_save):
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": 4},
            checkpoint={"save": str(save), "keep_last": 1, "async_save": async_save},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    assert rc == 0, err
    [(rc, out, err)] = run(["--config", str(cfg), "training.train_iters=6"], fork=True, prelude=FILE_SIZE_LIMIT)
    _one_line_error(
        rc,
        err,
        2,
        f"checkpoint.save {save}: saving iteration 6 failed",
        "file-size limit",
        "the last complete checkpoint iter_0000004 is intact",
    )
    assert [p.name for p in complete_checkpoints(save)] == ["iter_0000004"]
    assert verify(save / "iter_0000004", checksums=True) is None
    assert (save / TRACKER_FILE).read_text().strip() == "4"
    assert not list(save.glob("iter_*.tmp")) and not (save / run_lock.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_checkpoint_before_the_first_update_nor_during_a_nonfinite_streak(data, tmp_path):
    # init_method_std=1e30: the very first forward overflows, every step is skipped.
    save = tmp_path / "never"
    cfg = write_config(
        tmp_path / "never.yaml",
        tiny_config(
            *data,
            save,
            model={"init_method_std": 1e30},
            training={"max_consecutive_nan_steps": 3},
            checkpoint={"save": str(save), "save_interval": 1, "keep_last": 1},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    _one_line_error(rc, err, 3, "training.max_consecutive_nan_steps", "nothing was saved")
    assert "not saving at step 1: no optimizer step has been applied yet" in out
    assert not list(save.glob("iter_*"))

    # lr=1e30: step 1 is finite and applied, then every step overflows; keep_last=1 must keep iter_1.
    save = tmp_path / "streak"
    cfg = write_config(
        tmp_path / "streak.yaml",
        tiny_config(
            *data,
            save,
            training={"lr": 1e30, "min_lr": 0.0, "lr_warmup_iters": 0, "max_consecutive_nan_steps": 3},
            checkpoint={"save": str(save), "save_interval": 1, "keep_last": 1},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)], fork=True)
    _one_line_error(rc, err, 3, "training.max_consecutive_nan_steps", "iter_0000001 is kept")
    assert "not saving at step 2: the last step was non-finite" in out
    assert [p.name for p in complete_checkpoints(save)] == ["iter_0000001"]
    assert [r["skipped_steps"] for _, r in sorted(read_metrics(save / "tensorboard").items())] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_and_the_end_of_training_during_a_nonfinite_streak(data, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={
                "lr": 1e30,
                "min_lr": 0.0,
                "lr_warmup_iters": 0,
                "train_iters": 300,
                "max_consecutive_nan_steps": 1000,
            },
            checkpoint={"save": str(save), "save_interval": 0},
        ),
    )
    ranks = start(["--config", str(cfg)], fork=True)
    signal_when(ranks, "step 3/")
    [(rc, out, err)] = wait(ranks)
    assert rc == 75, err
    assert "not saving: the last step was non-finite (nothing was saved)" in out
    assert not list(save.glob("iter_*"))

    [(rc, out, err)] = run(["--config", str(cfg), "training.train_iters=3"], fork=True)
    _one_line_error(
        rc, err, 3, "training.train_iters=3 reached but the last step was non-finite", "no final checkpoint written"
    )
    assert not list(save.glob("iter_*"))


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm(data, tmp_path):
    """An interactive Ctrl-C finishes the step, saves and exits 75 (no KeyboardInterrupt traceback)."""
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(*data, save, training={"train_iters": 300}))
    ranks = start(["--config", str(cfg)], fork=True)
    signal_when(ranks, "step 2/", sig=signal.SIGINT)
    [(rc, out, err)] = wait(ranks)
    assert rc == 75 and err.strip() == "", err
    stopped = int((save / TRACKER_FILE).read_text())
    assert stopped >= 2 and verify(save / f"iter_{stopped:07d}", checksums=True) is None
