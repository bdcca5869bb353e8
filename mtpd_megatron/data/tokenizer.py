"""ByteLevel BPE training and a megatron-core tokenizer backed by a Hugging Face ``tokenizer.json``.

Why a small subclass instead of megatron's own ``huggingface`` library: that one loads through
``transformers.AutoTokenizer`` (an optional extra here) and expects a model directory. This module keeps the
megatron-core API (``MegatronTokenizerText``: ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``pad``,
``bos``, ``unique_identifiers`` ...) and swaps in a library object that reads ``tokenizer.json`` with the
``tokenizers`` package alone, offline.

megatron-core is imported only when a tokenizer is loaded, so training a tokenizer stays light.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

from mtpd_megatron.checkpoint.atomic import atomic_files
from mtpd_megatron.cli import run_cli
from mtpd_megatron.data import DataError, cli_parser, ensure_megatron_importable

if TYPE_CHECKING:
    import tokenizers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)  # ids 0 and 1 in every tokenizer trained here
TOKENIZER_FILE = "tokenizer.json"
_FIX = "pass a tokenizer.json written by tools/train_tokenizer.py (or its directory)"


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """A tokenizer.json path, or a directory holding one -> the tokenizer.json path (DataError otherwise)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"tokenizer {p} does not exist; {_FIX}")
    return p


def read_hf_tokenizer(path: str | os.PathLike) -> "tokenizers.Tokenizer":
    """Parse a tokenizer.json with the ``tokenizers`` package; a file that is not one -> DataError."""
    from tokenizers import Tokenizer

    p = resolve_tokenizer_file(path)
    try:
        with open(p, "rb") as f:
            json.load(f)  # a clearer message than the Rust parser for files that are not JSON at all
        return Tokenizer.from_file(str(p))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{p} is not JSON ({err}); {_FIX}")
    except Exception as err:  # tokenizers raises a bare Exception for JSON that is not a tokenizer
        raise DataError(f"{p} is not a Hugging Face tokenizer.json ({err}); {_FIX}")


def _special_from_config(tokenizer_file: Path, key: str) -> Optional[str]:
    """``key`` (eos_token, pad_token, bos_token) from a tokenizer_config.json next to the tokenizer, if any."""
    config = tokenizer_file.parent / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, dict):  # transformers' AddedToken serialisation
        value = value.get("content")
    return value if isinstance(value, str) else None


class _TokenizerJsonLibrary:
    """The megatron "library" layer (text <-> ids) over a ``tokenizers.Tokenizer``.

    Defined as a plain class and registered as a ``MegatronTokenizerTextAbstract`` virtual subclass on
    first load so that importing this module does not import megatron.
    """

    def __init__(self, tokenizer_file: Path, eod_token: Optional[str] = None) -> None:
        self.tokenizer_file = tokenizer_file
        self.tokenizer = read_hf_tokenizer(tokenizer_file)
        self.eos_token = eod_token or _special_from_config(tokenizer_file, "eos_token") or EOD_TOKEN
        self.eod_id = self.tokenizer.token_to_id(self.eos_token)
        if self.eod_id is None:
            raise DataError(
                f"{tokenizer_file} has no end-of-document token {self.eos_token!r}; "
                f"retrain it with tools/train_tokenizer.py or name its EOD token (eod_token=...)"
            )
        pad_token = _special_from_config(tokenizer_file, "pad_token") or PAD_TOKEN
        self.pad_token = pad_token if self.tokenizer.token_to_id(pad_token) is not None else None
        bos_token = _special_from_config(tokenizer_file, "bos_token") or self.eos_token
        self.bos_token = bos_token if self.tokenizer.token_to_id(bos_token) is not None else self.eos_token

    # text <-> ids
    def text_to_tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def tokens_to_text(self, tokens: list[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: list[str]) -> list[int]:
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        if any(i is None for i in ids):
            raise KeyError(f"token not in the vocabulary: {tokens[ids.index(None)]!r}")
        return ids  # type: ignore[return-value]

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=remove_special_tokens)

    def add_special_tokens(self, special_tokens: Any) -> int:
        tokens = list(special_tokens.values()) if isinstance(special_tokens, dict) else list(special_tokens)
        return self.tokenizer.add_special_tokens([t for t in tokens if isinstance(t, str)])

    def offsets(self, ids: list[int], text: str) -> list[int]:
        return [start for start, _ in self.tokenizer.encode(text, add_special_tokens=False).offsets]

    # vocabulary and special ids
    @property
    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def eos_id(self) -> int:
        return self.eod_id

    @property
    def bos_id(self) -> int:
        return self.tokenizer.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        if self.pad_token is None:  # megatron's dataset then falls back to a pad id outside the vocab
            raise AttributeError(f"{self.tokenizer_file} defines no pad token")
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> Optional[int]:
        return None  # byte-level BPE encodes every string; there is no unknown token

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        named = {self.eos_token, self.pad_token, self.bos_token}
        added = self.tokenizer.get_added_tokens_decoder()
        return sorted(i for i, tok in added.items() if tok.special and tok.content not in named)

    @property
    def space_sensitive(self) -> bool:
        return True


@functools.cache
def _tokenizer_class() -> type:
    """Create the megatron-core subclass on first use (importing megatron-core costs seconds)."""
    ensure_megatron_importable()
    from megatron.core.tokenizers.text.libraries.abstract_tokenizer import MegatronTokenizerTextAbstract
    from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

    MegatronTokenizerTextAbstract.register(_TokenizerJsonLibrary)

    class HFJsonTokenizer(MegatronTokenizerText):
        """megatron-core text tokenizer over a Hugging Face tokenizer.json (see the module docstring).

        GPTDataset needs ``vocab_size``, ``eod`` and ``pad``; ``unique_identifiers`` (part of megatron's
        dataset-cache key) carries a digest of the file so a retrained tokenizer never reuses stale indices.
        """

        def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
            self._eod_token = eod_token
            config = {
                "library": "tokenizers-json",
                "class_name": "HFJsonTokenizer",
                "class_path": __name__,
                "model_type": "gpt",
                "chat_template": None,
            }
            super().__init__(str(path), config)

        def _restore_model(self, **kwargs: Any) -> _TokenizerJsonLibrary:
            return _TokenizerJsonLibrary(Path(self.path), self._eod_token)

        def __reduce__(self) -> tuple:  # DataLoader workers started with spawn pickle the dataset config
            return (load_tokenizer, (self.path, self._eod_token))

        @property
        def hf_tokenizer(self) -> "tokenizers.Tokenizer":
            """The underlying ``tokenizers.Tokenizer`` (for fast batch encoding)."""
            return self._tokenizer.tokenizer

        @property
        def unique_identifiers(self) -> OrderedDict:
            ids: OrderedDict = OrderedDict()
            ids["class"] = f"{__name__}.HFJsonTokenizer"
            ids["tokenizer_sha256"] = _file_sha256(self.path)
            ids["eod"] = self.eod
            return ids

        def __repr__(self) -> str:
            return f"HFJsonTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"

    HFJsonTokenizer.__module__ = __name__
    HFJsonTokenizer.__qualname__ = "HFJsonTokenizer"
    return HFJsonTokenizer


@functools.lru_cache(maxsize=16)
def _file_sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    return _file_sha256_cached(path, st.st_mtime_ns, st.st_size)


def __getattr__(name: str) -> Any:
    if name == "HFJsonTokenizer":  # the class exists once megatron-core is imported
        return _tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_tokenizer(path: str | os.PathLike, eod_token: Optional[str] = None) -> Any:
    """Load a tokenizer.json (or a directory holding one) as a megatron-core ``MegatronTokenizerText``.

    The end-of-document token is ``eod_token``, else the ``eos_token`` of a tokenizer_config.json next to
    the file, else ``<|endoftext|>``. Raises DataError (one line: the path and the fix) for a missing
    path, a file that is not a tokenizer, or a tokenizer without that token.
    """
    tokenizer_file = resolve_tokenizer_file(path)
    read_hf_tokenizer(tokenizer_file)  # validate before importing megatron (fast failure for bad input)
    return _tokenizer_class()(str(tokenizer_file.resolve()), eod_token)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet + specials + at least one merge


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    length: Optional[int] = None,
    show_progress: bool = False,
) -> "tokenizers.Tokenizer":
    """Train a GPT-2 style ByteLevel BPE; ``<|endoftext|>`` gets id 0 and ``<|pad|>`` id 1.

    Byte-level (all 256 bytes in the initial alphabet) means any text encodes without an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json for ``transformers.PreTrainedTokenizerFast`` (GPT-2 conventions, no auto BOS)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(tok: "tokenizers.Tokenizer", out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, each via temp + rename."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config()
    files = {
        TOKENIZER_FILE: tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2
        ),
    }
    names = sorted(files, key=lambda n: n == TOKENIZER_FILE)  # tokenizer.json last: it marks a complete directory
    with atomic_files(*(out / name for name in names)) as temps:
        for name, tmp in zip(names, temps):
            tmp.write_text(files[name] + "\n", encoding="utf-8")
    return out / TOKENIZER_FILE


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    json_key: str = "text",
    txt_mode: str = "file",
    show_progress: bool = False,
) -> Path:
    """Train on the documents of .jsonl/.txt ``inputs`` and save to ``out_dir``; returns tokenizer.json's path."""
    from mtpd_megatron.data.corpus import check_input_file, iter_documents

    paths = [check_input_file(p) for p in inputs]
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}")
    counter = {"docs": 0}
    failure: list[DataError] = []

    def texts() -> Iterator[str]:
        # A bad line must surface as our DataError, not as whatever the Rust trainer wraps it in.
        try:
            for p in paths:
                for text, _ in iter_documents(p, json_key=json_key, txt_mode=txt_mode):
                    if text.strip():
                        counter["docs"] += 1
                        yield text
        except DataError as err:
            failure.append(err)

    tok = train_bpe(texts(), vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress)
    if failure:
        raise failure[0]
    if counter["docs"] == 0:
        raise DataError(f"no non-empty documents in {', '.join(map(str, paths))}; check the input files")
    path = save_tokenizer(tok, out_dir)
    print(
        f"train_tokenizer: {counter['docs']} documents -> vocab {tok.get_vocab_size()} "
        f"(asked {vocab_size}), eod {EOD_TOKEN}=0, pad {PAD_TOKEN}=1 -> {path}",
        file=sys.stderr,
    )
    return path


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_parser("train_tokenizer.py", "Train a ByteLevel BPE tokenizer (HF tokenizers) on a corpus.")
    parser.add_argument("--input", nargs="+", required=True, help='.jsonl ({"text": ...} per line) or .txt files')
    parser.add_argument("--vocab-size", type=int, default=4096, help="target vocabulary incl. special tokens")
    parser.add_argument("--out", required=True, help="output directory for tokenizer.json and its configs")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    parser.add_argument("--json-key", default="text", help="jsonl field holding the document text")
    parser.add_argument(
        "--txt-mode",
        choices=("file", "blank-line"),
        default="file",
        help=".txt inputs: one document per file, or per blank-line-separated block",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory; choose another --out")
    train_tokenizer(
        args.input,
        out,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        json_key=args.json_key,
        txt_mode=args.txt_mode,
        show_progress=sys.stderr.isatty(),
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of tools/train_tokenizer.py: exit code 0, or 2 with a one-line error."""
    # DataError/OSError -> one line; quiet: megatron's import-time TE/Apex notes would bury it
    return run_cli("train_tokenizer.py", _main, argv, errors=(DataError, OSError), quiet=True)
