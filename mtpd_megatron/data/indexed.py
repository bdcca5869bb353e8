"""megatron-core indexed datasets (``.bin`` tokens + ``.idx`` index): writing them and checking them.

Writing (``preprocess``) tokenises documents in a process pool (ordered ``imap`` over chunks, so the output
does not depend on the worker count) and appends them with megatron-core's ``IndexedDatasetBuilder``, one
sequence per document (so megatron's split by sequence is a split by document). Both files are written
under temporary names and renamed only when complete.

Checking (``validate_indexed_dataset``) re-derives the ``.idx`` layout that megatron-core 0.19.2 reads
(``indexed_dataset._IndexReader``) with numpy alone, so a missing, truncated or corrupt file, or token ids
beyond the tokenizer's vocabulary, become a one-line DataError instead of a numpy/assert failure (or a
silent out-of-range embedding lookup) deep inside megatron.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from mtpd_megatron.checkpoint.atomic import atomic_files
from mtpd_megatron.cli import run_cli
from mtpd_megatron.data import DataError, cli_parser, ensure_megatron_importable

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py: _INDEX_HEADER
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}  # megatron's DType codes
_REBUILD = "re-create it with tools/preprocess_data.py"


@dataclass(frozen=True)
class IndexedInfo:
    """What a validated prefix holds (one sequence per document for data written by ``preprocess``)."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int
    max_token_id: Optional[int]


def _fail_if_suffixed(prefix: str) -> None:
    if prefix.endswith((".bin", ".idx")):
        raise DataError(f"data path {prefix} ends in {prefix[-4:]}; give the prefix without .bin/.idx")


def validate_indexed_dataset(prefix: str | os.PathLike, *, vocab_size: Optional[int] = None) -> IndexedInfo:
    """Check ``prefix.idx``/``prefix.bin`` for consistency (and, with ``vocab_size``, every token id).

    Raises DataError naming the file and the fix. Cost: O(#sequences) for the index; the vocabulary check
    reads the whole .bin once (memory-mapped, in chunks), ~1 s per GB.
    """
    prefix = os.fspath(prefix)
    _fail_if_suffixed(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} does not exist; create {prefix}.bin/.idx with tools/preprocess_data.py or fix data.paths"
            )

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise DataError(f"{idx_path} is not a megatron index file (bad header); {_REBUILD}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx_path} has unknown version {version} or dtype code {code}; {_REBUILD}")
    dtype = np.dtype(_DTYPES[code])
    expected = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_size not in (expected, expected + n_seq):  # + n_seq: multimodal indices carry one mode byte each
        raise DataError(f"{idx_path} is truncated or corrupt ({idx_size} bytes, expected {expected}); {_REBUILD}")
    if n_seq == 0 or n_doc < 2:
        raise DataError(f"{idx_path} holds no documents; {_REBUILD} from non-empty input")

    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        lengths = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
        pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=_HEADER_BYTES + 4 * n_seq)
        documents = np.frombuffer(index, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
        ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize
        starts = np.concatenate(([0], ends[:-1]))
        if (lengths < 0).any() or not np.array_equal(pointers, starts):
            raise DataError(f"{idx_path} has inconsistent sequence offsets (corrupt); {_REBUILD}")
        if documents[0] != 0 or documents[-1] != n_seq or (np.diff(documents) < 0).any():
            raise DataError(f"{idx_path} has inconsistent document boundaries (corrupt); {_REBUILD}")
        num_tokens = int(ends[-1] // dtype.itemsize)
    finally:
        del index

    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * dtype.itemsize:
        state = "truncated" if bin_size < num_tokens * dtype.itemsize else "longer than its index"
        raise DataError(
            f"{bin_path} is {state} ({bin_size} bytes, index says {num_tokens * dtype.itemsize}); {_REBUILD}"
        )

    max_id: Optional[int] = None
    if vocab_size is not None and num_tokens > 0:
        lo, max_id = _scan_tokens(bin_path, dtype, num_tokens)
        _check_token_range(bin_path, lo, max_id, vocab_size)
    return IndexedInfo(prefix, dtype, int(n_seq), int(n_doc - 1), num_tokens, max_id)


def _scan_tokens(
    bin_path: str, dtype: np.dtype, num_tokens: int, chunk: int = 1 << 25, counts: Optional[np.ndarray] = None
) -> tuple[int, int]:
    """(smallest, largest) token id of ``bin_path``, read once, memory-mapped in chunks; with ``counts``, each
    chunk whose ids all fit in it is also added to it (bincount), so a caller that counts reads the file once."""
    data = np.memmap(bin_path, mode="r", dtype=dtype, shape=(num_tokens,))
    try:
        lo, hi = None, None
        for start in range(0, num_tokens, chunk):
            part = data[start : start + chunk]
            p_lo, p_hi = int(part.min()), int(part.max())
            lo = p_lo if lo is None else min(lo, p_lo)
            hi = p_hi if hi is None else max(hi, p_hi)
            if counts is not None and p_lo >= 0 and p_hi < len(counts):
                counts += np.bincount(part, minlength=len(counts))
        assert lo is not None and hi is not None
        return lo, hi
    finally:
        del data


def _check_token_range(bin_path: str, lo: int, hi: int, vocab_size: int) -> None:
    if lo < 0:
        raise DataError(f"{bin_path} holds negative token ids (corrupt); {_REBUILD}")
    if hi >= vocab_size:
        raise DataError(
            f"{bin_path} holds token id {hi} but the tokenizer has only {vocab_size} ids; use the "
            f"tokenizer the data was made with (data.tokenizer) or re-run tools/preprocess_data.py with this one"
        )


def token_counts(prefix: str | os.PathLike, vocab_size: int, chunk: int = 1 << 25) -> np.ndarray:
    """How often each token id occurs in ``prefix.bin`` -> int64 [vocab_size], validated as
    `validate_indexed_dataset(prefix, vocab_size=...)` does, in the same single read of the .bin. The frequency
    ranking of a draft vocabulary (inference/decoder.py) comes from here."""
    info = validate_indexed_dataset(prefix)
    counts = np.zeros(vocab_size, dtype=np.int64)
    bin_path = os.fspath(prefix) + ".bin"
    if info.num_tokens > 0:
        _check_token_range(bin_path, *_scan_tokens(bin_path, info.dtype, info.num_tokens, chunk, counts), vocab_size)
    return counts


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


class _Encoder:
    """Documents -> token id arrays (+ EOD when asked), already in the output dtype (cheap to send back)."""

    def __init__(self, tokenizer_file: str, eod: Optional[int], dtype: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.eod = eod
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        tail = [self.eod] if self.eod is not None else []
        return [np.asarray(enc.ids + tail, dtype=self.dtype) for enc in encodings]


_POOL_ENCODER: Optional[_Encoder] = None


def _init_pool_worker(tokenizer_file: str, eod: Optional[int], dtype: str) -> None:
    """Pool initializer: one tokenizer per worker process, Rust threads off (the workers are the parallelism)."""
    global _POOL_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _POOL_ENCODER = _Encoder(tokenizer_file, eod, dtype)


def _pool_encode(texts: list[str]) -> list[np.ndarray]:
    assert _POOL_ENCODER is not None, "pool worker not initialised"
    return _POOL_ENCODER(texts)


def _chunks(inputs: Sequence[Path], chunk_docs: int, json_key: str, txt_mode: str) -> Iterator[tuple[list[str], int]]:
    from mtpd_megatron.data.corpus import iter_documents

    texts: list[str] = []
    nbytes = 0
    for path in inputs:
        for text, raw in iter_documents(path, json_key=json_key, txt_mode=txt_mode):
            texts.append(text)
            nbytes += raw
            if len(texts) == chunk_docs:
                yield texts, nbytes
                texts, nbytes = [], 0
    if texts:
        yield texts, nbytes


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    output_prefix: str | os.PathLike,
    *,
    workers: int = 1,
    append_eod: bool = False,
    json_key: str = "text",
    txt_mode: str = "file",
    chunk_docs: int = 32,
    progress: bool = True,
) -> IndexedInfo:
    """Tokenise ``inputs`` (.jsonl / .txt, see ``corpus.iter_documents``) into ``output_prefix.bin/.idx``.

    Each document becomes one sequence (+ ``<|endoftext|>`` with ``append_eod``, which GPT pretraining
    wants so that documents concatenated into one sample stay separated). Empty documents are skipped.
    Tokens are uint16 when the vocabulary has fewer than 65500 ids, else int32 (megatron's rule).
    """
    from mtpd_megatron.data.corpus import check_input_file
    from mtpd_megatron.data.tokenizer import read_hf_tokenizer, resolve_tokenizer_file

    paths = [check_input_file(p) for p in inputs]
    prefix = os.fspath(output_prefix)
    _fail_if_suffixed(prefix)
    if workers < 1 or chunk_docs < 1:
        raise DataError("--workers and the chunk size must be >= 1")
    tokenizer_file = resolve_tokenizer_file(tokenizer)
    hf = read_hf_tokenizer(tokenizer_file)
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    eod: Optional[int] = None
    if append_eod:
        from mtpd_megatron.data.tokenizer import load_tokenizer

        eod = load_tokenizer(tokenizer_file).eod  # the same EOD rule the datasets use
    out_dir = Path(prefix).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output directory {out_dir} is a file; choose another --output-prefix")

    ensure_megatron_importable()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    dtype = np.dtype(DType.optimal_dtype(vocab_size))
    out_dir.mkdir(parents=True, exist_ok=True)
    # One hidden temp prefix for the pair, renamed onto the real names only once both are complete.
    with atomic_files(str(prefix) + ".bin", str(prefix) + ".idx") as (tmp_bin, tmp_idx):
        tmp_prefix = str(tmp_bin.with_suffix(""))
        total_bytes = sum(p.stat().st_size for p in paths)
        docs = skipped = tokens = 0
        pool = None
        builder = None
        try:
            builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype.type)
            chunks = _chunks(paths, chunk_docs, json_key, txt_mode)
            sizes: list[int] = []

            def texts_only() -> Iterator[list[str]]:
                for texts, nbytes in chunks:
                    sizes.append(nbytes)
                    yield texts

            if workers == 1:  # in this process; encode_batch still uses the Rust thread pool
                encoded: Iterable[list[np.ndarray]] = map(_Encoder(str(tokenizer_file), eod, dtype.name), texts_only())
            else:
                # fork where available: workers start at once (spawn would re-import torch via the package);
                # they only run the Rust tokenizer, which this process has not used in parallel yet.
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                pool = multiprocessing.get_context(method).Pool(
                    workers, initializer=_init_pool_worker, initargs=(str(tokenizer_file), eod, dtype.name)
                )
                encoded = pool.imap(_pool_encode, texts_only())
            with tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                desc="tokenise",
                disable=not progress,
                file=sys.stderr,
                mininterval=1.0,
            ) as bar:
                for i, arrays in enumerate(encoded):
                    for ids in arrays:
                        if len(ids) == (1 if eod is not None else 0):
                            skipped += 1
                            continue
                        builder.add_document(ids, [len(ids)])
                        docs += 1
                        tokens += len(ids)
                    bar.update(sizes[i])
                    bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
            if docs == 0:
                raise DataError(f"no non-empty documents in {', '.join(map(str, paths))}; check the input files")
            builder.finalize(str(tmp_idx))
            info = validate_indexed_dataset(tmp_prefix)  # cheap self-check of what the builder wrote
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if builder is not None:
                builder.data_file.close()  # already closed by finalize() on success
    print(
        f"preprocess: {docs} documents ({skipped} empty skipped), {tokens:,} tokens as {dtype.name} "
        f"-> {prefix}.bin/.idx",
        file=sys.stderr,
    )
    return IndexedInfo(prefix, dtype, info.num_sequences, info.num_documents, info.num_tokens, None)


# ----------------------------------------------------------------------------------------------------------
# CLI (tools/preprocess_data.py)
# ----------------------------------------------------------------------------------------------------------


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_parser("preprocess_data.py", "Tokenise jsonl/txt documents into megatron .bin/.idx files.")
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help='.jsonl (one {"text": ...} per line) or .txt files, concatenated in this order',
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokeniser processes")
    parser.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    parser.add_argument("--json-key", default="text", help="jsonl field holding the document text")
    parser.add_argument(
        "--txt-mode",
        choices=("file", "blank-line"),
        default="file",
        help=".txt inputs: one document per file, or per blank-line-separated block",
    )
    parser.add_argument("--chunk-docs", type=int, default=32, help="documents per task sent to a worker")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    preprocess(
        args.input,
        args.tokenizer,
        args.output_prefix,
        workers=args.workers,
        append_eod=args.append_eod,
        json_key=args.json_key,
        txt_mode=args.txt_mode,
        chunk_docs=args.chunk_docs,
        progress=not args.quiet,
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of tools/preprocess_data.py: exit code 0, or 2 with a one-line error."""
    # DataError/OSError -> one line; quiet: megatron's import-time TE/Apex notes would bury it
    return run_cli("preprocess_data.py", _main, argv, errors=(DataError, OSError), quiet=True)
