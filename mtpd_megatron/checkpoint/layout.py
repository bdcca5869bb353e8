"""The checkpoint directory on disk: names, completeness, atomic publish, keep-last-K, resume choice.

Layout (Megatron-LM's names, so its tools find our checkpoints):

    <root>/iter_0000200/                  a complete torch_dist checkpoint + mtpd_checkpoint.json
    <root>/iter_0000300.tmp/              being written (or left by a crash): never loaded, removed later
    <root>/latest_checkpointed_iteration.txt

A checkpoint is written under `iter_N.tmp`, renamed to `iter_N` only once every rank has finished, and the
tracker file is replaced last. So a crash at any point leaves the previous complete checkpoint intact, and
`--resume auto` takes the newest directory that passes `verify` (the tracker is only a hint for humans and
Megatron-LM tools). `verify` checks the files a load will read, including that no shard file is truncated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

META_FILE = "mtpd_checkpoint.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_NAME = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER = re.compile(r"^iter_\d{7,}\.(tmp|del)$")


class CheckpointError(RuntimeError):
    """A user-facing checkpoint problem, one line (the CLI exits with code 2)."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> Optional[int]:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Published (renamed) checkpoint directories, oldest first. Not verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=iteration_of)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic_with(path, write)


def write_atomic_with(path: Path, write) -> None:
    """`write(tmp_path)` produces the file's content at a temporary path in the same directory, which is then
    renamed over `path`: readers (and an interrupted run) see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def read_meta(ckpt: Path) -> dict:
    with open(Path(ckpt) / META_FILE) as f:
        return json.load(f)


def verify(ckpt: Path) -> Optional[str]:
    """None when `ckpt` is a complete, readable checkpoint; otherwise the reason it is not."""
    ckpt = Path(ckpt)
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError) as e:
        return f"{META_FILE} unreadable ({e.__class__.__name__})"
    if not isinstance(meta, dict) or "iteration" not in meta:
        return f"{META_FILE} has no iteration"
    if not (ckpt / "metadata.json").is_file():
        return "metadata.json missing (torch_dist save did not finish)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    except Exception as e:  # a truncated or missing .metadata raises various errors
        return f"torch_dist .metadata unreadable ({e.__class__.__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in needed.items():
        f = ckpt / rel
        if not f.is_file():
            return f"shard file {rel} missing"
        if f.stat().st_size < size:
            return f"shard file {rel} truncated ({f.stat().st_size} < {size} bytes)"
    return None


def newest_valid(root: Path, log=print) -> Optional[Path]:
    """The newest complete checkpoint under `root` that passes `verify`, falling back to older ones."""
    for ckpt in reversed(complete_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log(f"[checkpoint] skipping {ckpt}: {problem}")
    return None


def resolve(spec: str, root: Optional[str], log=print, flag: str = "--resume") -> Optional[Path]:
    """`auto` -> newest valid under root (or None); `none` -> None; a path -> that checkpoint (or newest in it).

    `flag` is the option the user gave `spec` with, for the error messages (--resume, or --ckpt in the tools).
    """
    hint = "pass auto, none or an iter_XXXXXXX directory" if flag == "--resume" else "pass a save directory or an iter_XXXXXXX directory"
    if spec == "none":
        return None
    if spec == "auto":
        return newest_valid(Path(root), log) if root else None
    path = Path(spec)
    if iteration_of(path) is None and path.is_dir() and complete_checkpoints(path):
        found = newest_valid(path, log)
        if found is None:
            raise CheckpointError(f"{flag} {spec}: no complete checkpoint inside (every iter_* failed verification)")
        return found
    if not path.is_dir():
        raise CheckpointError(f"{flag} {spec}: no such checkpoint directory ({hint})")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{flag} {spec}: not a complete checkpoint ({problem}); pick another"
                              + (" or use --resume auto" if flag == "--resume" else ""))
    return path


def prepare_tmp(root: Path, iteration: int) -> Path:
    """(rank 0) A fresh empty `iter_N.tmp` directory."""
    tmp = Path(root) / (iter_dir_name(iteration) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(root: Path, iteration: int, meta: dict, keep_last: int) -> Path:
    """(rank 0, after every rank finished writing) meta file -> rename -> tracker -> prune."""
    root = Path(root)
    tmp = root / (iter_dir_name(iteration) + ".tmp")
    final = root / iter_dir_name(iteration)
    write_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True, default=str))
    if final.exists():  # the same step saved again (e.g. preempted right after a resume)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic(root / TRACKER_FILE, f"{iteration}\n")
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            _remove(old)
    return final


def _remove(path: Path) -> None:
    """Rename out of the `iter_N` namespace first, so a crash mid-delete never leaves a half checkpoint."""
    doomed = path.with_name(path.name + ".del")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> None:
    """(rank 0, at start-up) delete `.tmp`/`.del` directories that crashed runs left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and _LEFTOVER.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
