"""The checkpoint directory on disk: names, completeness, integrity, atomic publish, keep-last-K, resume choice.

Layout (Megatron-LM's names, so its tools find our checkpoints):

    <root>/iter_0000200/                  a complete torch_dist checkpoint + mtpd_checkpoint.json + integrity.json
    <root>/iter_0000300.tmp/              being written (or left by a crash): never loaded, removed later
    <root>/latest_checkpointed_iteration.txt
    <root>/.mtpd_run.lock                 held by the trainer writing here (lock.py)

A checkpoint is written under `iter_N.tmp`, renamed to `iter_N` only once every rank has finished, and the
tracker file is replaced last. So a crash at any point leaves the previous complete checkpoint intact, and
`--resume auto` takes the newest directory that passes `verify` (the tracker is only a hint for humans and
Megatron-LM tools). `verify` checks the files a load will read, including that no shard file is truncated.

Integrity: every file of a published checkpoint has a SHA-256 digest in `integrity.json`, megatron-core's own
manifest (dist_checkpointing/validation.py `save_integrity_manifest`, same name, algorithm and payload), so
`dist_checkpointing.load(..., verify_integrity=True)` and Megatron-LM's tools can check our checkpoints too.
We do not let megatron write it: its writer hashes every file on rank 0 in the finalize step, i.e. the whole
checkpoint serially and, with async saves, inside the training loop. Here each rank hashes the shard files it
wrote, in the process that wrote them (the forked writer for async saves), into `.integrity.rank<R>.json`;
`publish` merges those parts, hashes the few small files left (.metadata, metadata.json, our metadata) and
writes the manifest before the rename. A flipped or zeroed block that keeps the file size passes the size
checks but not the digest: such a checkpoint is skipped like a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from mtpd_megatron.checkpoint.atomic import replace_dir, write_atomic
from mtpd_megatron.checkpoint.metadata import (  # noqa: F401 (re-exported: the names a reader of a checkpoint needs)
    HF_IMPORT_STAGE,
    META_FILE,
    CheckpointError,
    meta_problem,
    read_meta,
)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# megatron-core's manifest (dist_checkpointing/validation.py INTEGRITY_FNAME, _HASH_ALGORITHM); kept as
# literals so that this module stays free of torch (tests/test_checkpoint.py checks they still agree).
INTEGRITY_FILE = "integrity.json"
INTEGRITY_ALGORITHM = "sha256"
_PART = re.compile(r"^\.integrity\.rank(\d+)\.json$")
_NAME = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER = re.compile(r"^iter_\d{7,}\.(tmp|del)$")
_CHUNK = 8 << 20


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


# ---------------------------------------------------------------------------------------------------------
# Integrity (digests of every file)
# ---------------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """SHA-256 hex digest of a file, streamed (the GIL is released while hashing large chunks)."""
    h = hashlib.new(INTEGRITY_ALGORITHM)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def write_integrity_part(ckpt_tmp: Path, rank: int, files: Iterable[Path]) -> None:
    """(any rank, after writing its shard files) the digests of `files` for `publish` to merge."""
    digests = {Path(f).name: file_digest(Path(f)) for f in sorted(files)}
    write_atomic(Path(ckpt_tmp) / f".integrity.rank{rank}.json", json.dumps(digests, sort_keys=True))


def rank_shard_files(ckpt_tmp: Path, rank: int) -> list[Path]:
    """The torch_dist shard files a rank writes: torch DCP names them `__<rank>_<i>.distcp`
    (megatron's FileSystemWriterAsync.prepare_decentralized_global_plan)."""
    return sorted(Path(ckpt_tmp).glob(f"__{rank}_*.distcp"))


def _write_integrity_manifest(ckpt_tmp: Path) -> None:
    """Merge the ranks' parts, hash every file they do not cover, write megatron's `integrity.json`."""
    ckpt_tmp = Path(ckpt_tmp)
    files: dict[str, str] = {}
    parts = [p for p in ckpt_tmp.iterdir() if _PART.match(p.name)]
    for part in parts:
        with open(part) as f:
            files.update(json.load(f))
    for entry in sorted(ckpt_tmp.iterdir()):
        if (
            entry.is_file()
            and entry.name != INTEGRITY_FILE
            and not _PART.match(entry.name)
            and entry.name not in files
            and not entry.name.startswith(f".{INTEGRITY_FILE}.")
        ):
            files[entry.name] = file_digest(entry)
    payload = {"algorithm": INTEGRITY_ALGORITHM, "files": dict(sorted(files.items()))}
    write_atomic(ckpt_tmp / INTEGRITY_FILE, json.dumps(payload, indent=2))
    for part in parts:
        part.unlink()


def read_integrity(ckpt: Path) -> Optional[dict]:
    """{file name: digest} of a checkpoint, or None for one written before checksums existed.
    Raises CheckpointError when the manifest exists but is unreadable (a damaged checkpoint)."""
    path = Path(ckpt) / INTEGRITY_FILE
    if not path.exists():
        return None
    try:
        with open(path) as f:
            payload = json.load(f)
        files = payload["files"]
        algorithm = payload.get("algorithm", INTEGRITY_ALGORITHM)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{INTEGRITY_FILE} unreadable ({e.__class__.__name__})") from None
    if algorithm != INTEGRITY_ALGORITHM or not isinstance(files, dict):
        raise CheckpointError(f"{INTEGRITY_FILE} uses {algorithm!r}, not {INTEGRITY_ALGORITHM}")
    return files


def integrity_problem(ckpt: Path, names: Optional[Iterable[str]] = None) -> Optional[str]:
    """None when every file in the manifest (or the `names` among them) still has its digest; else why not.

    A checkpoint without a manifest (written before checksums) passes: there is nothing to compare with.
    """
    ckpt = Path(ckpt)
    try:
        files = read_integrity(ckpt)
    except CheckpointError as e:
        return str(e)
    if files is None:
        return None
    for name in sorted(files) if names is None else names:
        path = ckpt / name
        try:
            actual = file_digest(path)
        except OSError as e:
            return f"{name} unreadable ({e.strerror or e.__class__.__name__})"
        if actual != files[name]:
            return f"{name} does not match its {INTEGRITY_ALGORITHM} checksum (corrupted since it was written)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Completeness
# ---------------------------------------------------------------------------------------------------------


def shard_files(ckpt: Path) -> dict[str, int]:
    """{relative path: bytes needed} of the files torch_dist's .metadata points into (raises if unreadable)."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def verify(ckpt: Path, checksums: bool = False) -> Optional[str]:
    """None when `ckpt` is a complete, readable checkpoint; otherwise the reason it is not.

    The structural checks read only metadata (fast: `looped status`, resume choice). `checksums=True` also
    re-hashes every file against integrity.json (reads the whole checkpoint; the trainer does that part
    spread over its ranks, manager.py).
    """
    ckpt = Path(ckpt)
    _, problem = meta_problem(ckpt)
    if problem:
        return problem
    if not (ckpt / "metadata.json").is_file():
        return "metadata.json missing (torch_dist save did not finish)"
    try:
        needed = shard_files(ckpt)
    except Exception as e:  # a truncated or missing .metadata raises various errors
        return f"torch_dist .metadata unreadable ({e.__class__.__name__})"
    for rel, size in needed.items():
        f = ckpt / rel
        if not f.is_file():
            return f"shard file {rel} missing"
        if f.stat().st_size < size:
            return f"shard file {rel} truncated ({f.stat().st_size} < {size} bytes)"
    try:
        files = read_integrity(ckpt)
    except CheckpointError as e:
        return str(e)
    if files is not None:
        unlisted = sorted(set(needed) - set(files))
        if unlisted:
            return f"shard file {unlisted[0]} has no checksum in {INTEGRITY_FILE}"
    return integrity_problem(ckpt) if checksums else None


def newest_valid(root: Path, log=print, checksums: bool = False) -> Optional[Path]:
    """The newest complete checkpoint under `root` that passes `verify`, falling back to older ones."""
    for ckpt in reversed(complete_checkpoints(root)):
        problem = verify(ckpt, checksums)
        if problem is None:
            return ckpt
        log(f"[checkpoint] skipping {ckpt}: {problem}")
    return None


def no_valid_checkpoint(root: Path, flag: str) -> CheckpointError:
    fix = "fix or move them, or start fresh with --resume none" if flag == "--resume" else "pass another checkpoint"
    return CheckpointError(
        f"{flag}: {root} holds checkpoints but none is complete and intact (each was skipped above); {fix}"
    )


def resolve(
    spec: str, root: Optional[str], log=print, flag: str = "--resume", checksums: bool = False
) -> Optional[Path]:
    """`auto` -> newest valid under root (or None); `none` -> None; a path -> that checkpoint (or newest in it).

    `flag` is the option the user gave `spec` with, for the error messages (--resume, or --ckpt in the tools).
    A directory that holds published checkpoints none of which is valid is an error, never a fresh start
    (that would train from scratch beside them, and keep-last would then prune by iteration).
    """
    hint = (
        "pass auto, none or an iter_XXXXXXX directory"
        if flag == "--resume"
        else "pass a save directory or an iter_XXXXXXX directory"
    )
    if spec == "none":
        return None
    if spec == "auto":
        if not root:
            return None
        found = newest_valid(Path(root), log, checksums)
        if found is None and complete_checkpoints(Path(root)):
            raise no_valid_checkpoint(Path(root), flag)
        return found
    path = Path(spec)
    if iteration_of(path) is None and path.is_dir() and complete_checkpoints(path):
        found = newest_valid(path, log, checksums)
        if found is None:
            raise CheckpointError(f"{flag} {spec}: no complete checkpoint inside (every iter_* failed verification)")
        return found
    if not path.is_dir():
        raise CheckpointError(f"{flag} {spec}: no such checkpoint directory ({hint})")
    problem = verify(path, checksums)
    if problem:
        raise CheckpointError(
            f"{flag} {spec}: not a complete checkpoint ({problem}); pick another"
            + (" or use --resume auto" if flag == "--resume" else "")
        )
    return path


def prepare_tmp(root: Path, iteration: int) -> Path:
    """(rank 0) A fresh empty `iter_N.tmp` directory."""
    tmp = Path(root) / (iter_dir_name(iteration) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(root: Path, iteration: int, meta: dict, keep_last: int) -> Path:
    """(rank 0, after every rank finished writing) meta file -> integrity manifest -> rename -> tracker -> prune."""
    root = Path(root)
    tmp = root / (iter_dir_name(iteration) + ".tmp")
    final = root / iter_dir_name(iteration)
    write_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True, default=str))
    _write_integrity_manifest(tmp)
    # the same step saved again (e.g. preempted right after a resume): the old one goes out as iter_N.del
    replace_dir(tmp, final, aside=final.with_name(final.name + ".del"))
    write_atomic(root / TRACKER_FILE, f"{iteration}\n")
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            _remove(old)
    return final


def discard_tmp(root: Path, iteration: int) -> None:
    """(rank 0, after a failed save) remove the half-written `iter_N.tmp`, freeing its space at once."""
    shutil.rmtree(Path(root) / (iter_dir_name(iteration) + ".tmp"), ignore_errors=True)


def _remove(path: Path) -> None:
    """Rename out of the `iter_N` namespace first, so a crash mid-delete never leaves a half checkpoint."""
    doomed = path.with_name(path.name + ".del")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> None:
    """(rank 0, at start-up, holding the run lock) delete `.tmp`/`.del` directories that crashed runs left."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and _LEFTOVER.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
