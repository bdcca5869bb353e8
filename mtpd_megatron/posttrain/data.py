"""The new domain's text as fixed-length token sequences, split into training and held-out by whole documents.

Sources need no download: 'stdlib' is the running interpreter's standard library (`sysconfig.get_paths()
['stdlib']`, its test suites left out: CPython's own tests repeat the library and would leak structure into the
held-out split), and directories, .jsonl or text files name other offline text. The tokenizer is the export's
own tokenizer.json (the pretraining one: a fine-tune must not change what the ids mean to the heads), each
document ends with its end-of-document token as in megatron's preprocessing (`--append-eod`), and documents are
concatenated and cut into sequences of seq_length + 1 tokens (inputs and next-token labels).

Held-out documents are chosen by a hash of their name, so the split is the same on every machine and in every run:
repetition of a document in both halves would inflate every method's acceptance alike (research/data.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mtpd_megatron.config.load import ConfigError
from mtpd_megatron.posttrain.config import STDLIB, PosttrainData

_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class DomainData:
    train: torch.Tensor  # [n, seq_length + 1] int64
    valid: torch.Tensor  # [m, seq_length + 1] int64
    documents: dict  # {'train': count, 'valid': count}
    tokens: dict  # {'train': count, 'valid': count} before cutting into sequences
    sources: list


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, pattern: str, skip: set) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if fnmatch.fnmatch(name, pattern):
                yield Path(dirpath) / name


def iter_documents(paths: list, pattern: str) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of `paths`, in a fixed order; names are relative to their source."""
    for entry in paths:
        if entry == STDLIB:
            root = stdlib_root()
            for f in _walk(root, pattern, _SKIPPED_STDLIB_DIRS):
                yield f"stdlib/{f.relative_to(root)}", f.read_text(encoding="utf-8", errors="replace")
            continue
        p = Path(entry)
        if p.is_dir():
            for f in _walk(p, pattern, {"__pycache__"}):
                yield f"{p.name}/{f.relative_to(p)}", f.read_text(encoding="utf-8", errors="replace")
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        try:
                            yield f"{p.name}:{i}", json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise ConfigError(
                                f"data.paths {p}: line {i + 1} is not a JSON object with 'text'"
                            ) from None
        else:
            yield p.name, p.read_text(encoding="utf-8", errors="replace")


def is_heldout(name: str, fraction: float) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _eod_id(tok) -> int:
    from mtpd_megatron.data.tokenizer import EOD_TOKEN

    eod = tok.token_to_id(EOD_TOKEN)
    if eod is None:
        raise ConfigError(
            f"model.path: the export's tokenizer has no {EOD_TOKEN} token (documents could not be "
            f"separated as in pretraining)"
        )
    return eod


def _pack(token_lists: list, length: int) -> torch.Tensor:
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // length
    return torch.tensor(flat[: n * length], dtype=torch.long).view(n, length)


def load_domain(data: PosttrainData, tokenizer_file: Path, *, seed: int) -> DomainData:
    """Tokenise the sources with `tokenizer_file`; training sequences shuffled with `seed`, held-out in order."""
    from mtpd_megatron.data.tokenizer import read_hf_tokenizer

    tok = read_hf_tokenizer(tokenizer_file)
    eod = _eod_id(tok)
    halves = {"train": [], "valid": []}
    for name, text in iter_documents(data.paths, data.glob):
        if text.strip():
            halves["valid" if is_heldout(name, data.valid_fraction) else "train"].append(text)
    counts = {k: len(v) for k, v in halves.items()}
    if not counts["valid"] or not counts["train"]:
        raise ConfigError(
            f"data.paths: {counts['train']} training and {counts['valid']} held-out documents (need "
            f"both: add text or change data.valid_fraction={data.valid_fraction})"
        )
    ids = {k: [e.ids + [eod] for e in tok.encode_batch(v)] for k, v in halves.items()}
    rng = random.Random(seed)
    rng.shuffle(ids["train"])  # document order; the sequences cut from them are shuffled again below
    tokens = {k: sum(len(x) for x in v) for k, v in ids.items()}
    length = data.seq_length + 1
    train = _pack(ids["train"], length)
    if data.max_train_tokens:
        train = train[: max(1, data.max_train_tokens // length)]
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
    valid = _pack(ids["valid"], length)[: data.valid_sequences]
    if len(valid) < data.valid_sequences or not len(train):
        raise ConfigError(
            f"data: {len(valid)} held-out and {len(train)} training sequences of {length} tokens "
            f"(data.valid_sequences={data.valid_sequences}); lower data.seq_length or "
            f"data.valid_sequences, or raise data.valid_fraction"
        )
    return DomainData(train=train, valid=valid, documents=counts, tokens=tokens, sources=list(data.paths))
