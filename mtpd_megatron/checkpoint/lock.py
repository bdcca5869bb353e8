"""One trainer per checkpoint directory: `<checkpoint.save>/.mtpd_run.lock`.

Why: two trainers on one directory delete each other's `iter_N.tmp` (start-up clean-up), interleave their
checkpoints and prune each other's with keep-last. The second one must stop at once, before it writes
anything, and say who holds the directory.

How it is held (rank 0 of the run; the other ranks only learn the outcome):
* an exclusive POSIX record lock (`lockf`) on the lock file, kept for the whole run. The kernel drops it
  when the process dies however it dies (kill -9 included), so on one host a dead holder never blocks
  anyone. POSIX locks rather than `flock`: they belong to the process and are not inherited by its forks
  (megatron's async writer, DataLoader workers), which would otherwise keep a dead trainer's lock alive
  for as long as they linger; NFS also carries them to the server (NLM/NFSv4). Their one trap, that
  closing any descriptor of the file drops the lock, is avoided: this process opens the file once;
* the file's content names the holder (host, pid, start time, Slurm job and restart count) for the error
  message and for holders on other hosts, where the lock may not reach (mounts with node-local locks);
* a heartbeat: a daemon thread touches the file every HEARTBEAT_S seconds.

A lock named in the file is stale (taken over, with one log line) when
1. we obtained the lock and the holder ran on this host (a live holder would still hold it), or
2. it is an earlier incarnation of this Slurm job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT: a requeued
   job whose node died), or
3. its heartbeat is older than STALE_AFTER_S seconds (a holder on another host that is gone).
Otherwise the new trainer exits with code 2 and one line naming the holder and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from mtpd_megatron.checkpoint.layout import CheckpointError

LOCK_FILE = ".mtpd_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

try:
    import fcntl
except ImportError:  # not POSIX: the content rules alone decide
    fcntl = None


class LockHeld(CheckpointError):
    """Another live trainer holds the directory (exit code 2)."""


_HELD_HERE: set = set()  # lock files this process holds (a second RunLock here must not reopen them)


def _identity() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {when}"


def stale_reason(holder: dict, age_s: float, got_lock: bool, me: dict) -> Optional[str]:
    """Why the lock described by `holder` (heartbeat `age_s` seconds old) no longer holds, or None."""
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return "held by this process"
    if got_lock and holder.get("host") == me["host"]:
        return "its process is gone (its file lock was released)"
    if holder.get("host") == me["host"] and fcntl is None:
        try:
            os.kill(int(holder.get("pid")), 0)
        except (ProcessLookupError, TypeError, ValueError):
            return "its process is gone"
        except PermissionError:
            pass
    job = me.get("slurm_job_id")
    if (
        job
        and holder.get("slurm_job_id") == job
        and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]
    ):
        return "an earlier run of this Slurm job (requeued)"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """The lock of one checkpoint directory. `acquire()` raises LockHeld; `release()` is idempotent."""

    def __init__(self, directory: Path, log: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.log = log
        self._fd: Optional[int] = None
        self._created_dirs: list[Path] = []
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self.me = _identity()

    # -------------------------------------------------------------------------------------------- acquire

    def _make_directory(self) -> None:
        """Create the directory (and missing parents), remembering which, so that a run that stops with a
        user error leaves nothing behind (release removes them again if they are still empty)."""
        missing = []
        d = self.directory
        while not d.exists():
            missing.append(d)
            if d.parent == d:
                break
            d = d.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created_dirs = missing  # deepest first

    def _open_locked(self) -> tuple[int, str]:
        """(fd, state) on the current lock file: state is "locked" (ours), "held" (another process has it) or
        "unsupported" (no POSIX locks here). Retried when the file was replaced between open and lock."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                return fd, "unsupported"
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return fd, "held"
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return fd, "unsupported"
                os.close(fd)
                raise
            try:  # the holder may have unlinked the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, "locked"
            os.close(fd)
        raise LockHeld(f"checkpoint.save {self.directory}: could not take {self.path} (it keeps being replaced)")

    def acquire(self) -> "RunLock":
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            raise LockHeld(f"checkpoint.save {self.directory} is already in use by this process (lock {self.path})")
        try:
            self._make_directory()
            fd, state = self._open_locked()
        except OSError as e:
            self._remove_created_dirs()
            raise CheckpointError(
                f"checkpoint.save {self.directory}: cannot create the run lock "
                f"{self.path} ({e.strerror or e}); point checkpoint.save at a writable "
                "directory"
            ) from None
        try:
            holder, age = self._read_holder(fd)
            if state == "held":
                who = _describe(holder) if holder else "starting right now"
                raise LockHeld(self._held_message(who))
            if holder:
                reason = stale_reason(holder, age, state == "locked", self.me)
                if reason is None:
                    raise LockHeld(self._held_message(_describe(holder)))
                if reason != "held by this process":
                    self.log(f"[checkpoint] taking over the lock of {_describe(holder)}: {reason}")
            self._write_holder(fd)
        except BaseException:
            os.close(fd)
            self._remove_created_dirs()
            raise
        self._fd = fd
        self._key = key
        _HELD_HERE.add(key)
        self._beat = threading.Thread(target=self._heartbeat, name="mtpd-run-lock", daemon=True)
        self._beat.start()
        return self

    def _held_message(self, who: str) -> str:
        return (
            f"checkpoint.save {self.directory} is in use by another trainer ({who}; lock {self.path}): "
            f"stop that run or use another checkpoint.save (a lock whose holder died is taken over: on the "
            f"same host at once, from other hosts after {STALE_AFTER_S:.0f} s without heartbeat)"
        )

    @staticmethod
    def _read_holder(fd: int) -> tuple[Optional[dict], float]:
        st = os.fstat(fd)
        if st.st_size == 0:
            return None, 0.0
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 64 << 10)
        try:
            holder = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            holder = {"host": "?", "pid": "?", "note": "unreadable lock file"}
        if not isinstance(holder, dict):
            holder = {"host": "?", "pid": "?"}
        return holder, max(0.0, time.time() - st.st_mtime)

    def _write_holder(self, fd: int) -> None:
        data = json.dumps(self.me, sort_keys=True).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    # -------------------------------------------------------------------------------------------- release

    def release(self) -> None:
        self._stop.set()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            holder, _ = self._read_holder(fd)
            if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                os.unlink(self.path)  # before unlocking: a waiter then re-opens a fresh file (inode check)
        except OSError:
            pass
        finally:
            os.close(fd)
            _HELD_HERE.discard(self._key)
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in self._created_dirs:
            try:
                d.rmdir()  # only if empty: a run that wrote checkpoints keeps its directory
            except OSError:
                break
        self._created_dirs = []


def acquire_collective(directory: Optional[str], log: Callable[[str], None] = print) -> Optional[RunLock]:
    """(every rank) Rank 0 takes the lock of `directory`; all ranks raise the same LockHeld/CheckpointError."""
    import torch.distributed as dist

    if not directory:
        return None
    lock, outcome = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = RunLock(Path(directory), log).acquire()
        except CheckpointError as e:
            outcome = [(type(e).__name__, str(e))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise (LockHeld if kind == "LockHeld" else CheckpointError)(message)
    return lock
