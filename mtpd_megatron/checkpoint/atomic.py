"""Atomic writes: the one helper every writer in the project uses (checkpoints, converters, data, reports).

Why one place: a reader (a resumed run, `--resume auto`, the next pipeline stage, a user's `ls`) must see the
old file or the new one, never half of it, and an interrupted writer must leave nothing behind that looks
complete. The recipe is always the same: write under a temporary name in the target's own directory (same
filesystem, so the rename is atomic), rename over the target when the content is complete, fsync the
directory, and delete the temporary on any failure (Ctrl-C included).

Plain Python (no torch): `looped status`, the data tools and the report writers import it cheaply.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse directory fsync)."""
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


@contextlib.contextmanager
def atomic_files(*targets: "os.PathLike[str] | str") -> Iterator[tuple[Path, ...]]:
    """Yield temporary paths next to `targets`; when the block succeeds they are renamed over the targets, in
    the order given (put the file whose presence marks completeness last); on failure they are deleted.

    The temporaries of one call share a stem (`.NAME.<pid>.<token>.tmp` + the target's suffix), so writers
    that take a path prefix (megatron's indexed dataset: PREFIX.bin + PREFIX.idx) can write them as a pair.
    """
    paths = [Path(t) for t in targets]
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    temps = tuple(p.with_name(f".{p.stem}.{token}.tmp{p.suffix}") for p in paths)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
        for tmp, target in zip(temps, paths):
            os.replace(tmp, target)
        for parent in {p.parent for p in paths}:
            fsync_dir(parent)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_atomic_with(path: "os.PathLike[str] | str", write: Callable[[str], object]) -> None:
    """`write(tmp_path)` produces the file's content at a temporary path, which then replaces `path`."""
    with atomic_files(path) as (tmp,):
        write(str(tmp))


def write_atomic(path: "os.PathLike[str] | str", text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a mix."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic_with(path, write)


def replace_dir(src: Path, dst: Path, aside: Optional[Path] = None) -> None:
    """Rename directory `src` to `dst`. An existing `dst` is first renamed to `aside` (default: a fresh
    `DST.old-*` beside it) and deleted after, so `dst` is at every moment absent, the old one or the new one."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        if aside is None:
            old = Path(tempfile.mkdtemp(prefix=f"{dst.name}.old-", dir=dst.parent)) / dst.name
        else:
            old = Path(aside)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old if aside is not None else old.parent, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: "os.PathLike[str] | str", prefix: Optional[str] = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; it becomes `out` (replacing any old one) only when the
    block succeeds, and is removed on any exception."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
