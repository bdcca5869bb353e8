"""Train/valid/test GPT datasets via megatron-core's dataset builder, and a resumable data loader.

``build_datasets`` is a thin, checked front end to megatron-core's ``BlendedMegatronDatasetBuilder`` +
``GPTDatasetConfig`` + ``GPTDataset``: documents are split contiguously by ``split`` (e.g. "949,50,1"),
samples are ``seq_length + 1`` token windows over the seeded, shuffled concatenation of a split's
documents, and the sample indices are cached (``data.cache_dir``) so later runs and other ranks reuse them.
Before megatron opens anything, every prefix is validated (``indexed.validate_indexed_dataset``), so
missing/corrupt files and token ids beyond the vocabulary fail with one line naming the file and the fix.

``build_dataloader`` walks a dataset in index order from ``consumed_samples`` (megatron's GPTDataset already
shuffled it), one contiguous slice of each global batch per data-parallel rank -- Megatron-LM's
``MegatronPretrainingSampler`` -- so resuming at ``consumed_samples`` continues exactly where a run stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtpd_megatron.data import DataError, ensure_megatron_importable
from mtpd_megatron.data.indexed import IndexedInfo, validate_indexed_dataset

SPLIT_NAMES = ("train", "valid", "test")
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """Duck-typed config access (dataclass, namespace or mapping) -- the config schema may still change."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def parse_paths(paths: Any) -> tuple[list[str], Optional[list[float]]]:
    """``data.paths`` -> (prefixes, weights or None).

    Accepts a prefix string, a list of prefixes, or megatron's flat ``[w1, prefix1, w2, prefix2, ...]``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items = list(paths or [])
    if not items:
        raise DataError("data.paths is empty; set it to the prefix(es) written by tools/preprocess_data.py")

    def as_weight(x: Any) -> Optional[float]:
        if isinstance(x, bool):
            return None
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    weights = [as_weight(x) for x in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = [os.fspath(p) for p in items[1::2]]
        if not all(isinstance(p, str) and as_weight(p) is None for p in prefixes):
            raise DataError(f"data.paths {items!r} must alternate weight, prefix; fix the list")
        if not all(w > 0 and math.isfinite(w) for w in weights):  # type: ignore[operator]
            raise DataError(f"data.paths weights {weights} must be positive numbers; fix the list")
        return prefixes, [float(w) for w in weights]  # type: ignore[arg-type]
    if any(as_weight(x) is not None and not isinstance(x, os.PathLike) for x in items):
        raise DataError(f"data.paths {items!r} mixes weights and prefixes; use [w1, prefix1, w2, prefix2, ...]")
    return [os.fspath(p) for p in items], None


def _split_matrix(split: str) -> list[Optional[tuple[float, float]]]:
    ensure_megatron_importable()
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        vector = parse_and_normalize_split(str(split))
    except (AssertionError, ValueError):
        raise DataError(f"data.split {split!r} is not up to three 'train,valid,test' weights; use e.g. '949,50,1'")
    if not all(math.isfinite(v) for v in vector):
        raise DataError(f"data.split {split!r} has no positive part; use e.g. '949,50,1'")
    return convert_split_vector_to_split_matrix(vector)


def build_datasets(
    data_cfg: Any,
    tokenizer: Any,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]],
    create_attention_mask: Optional[bool] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """Build (train, valid, test) megatron-core GPT datasets for ``data_cfg.paths``.

    Args:
        data_cfg: has ``paths`` (prefix, prefixes, or ``[w1, p1, w2, p2]``), ``split``, ``cache_dir`` and
            optionally ``reset_position_ids`` / ``reset_attention_mask`` / ``eod_mask_loss`` (all False by
            default) and ``create_attention_mask``. Attribute or mapping access both work.
        tokenizer: a loaded tokenizer (``load_tokenizer``), or None to load ``data_cfg.tokenizer``.
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` tokens for the shifted labels).
        seed: seeds megatron's document and sample shuffles; same seed + data => identical samples.
        num_samples: samples to draw per split. A split of 0 samples is not built (None is returned);
            None means one pass over the split (single-prefix data only). More samples than one pass
            over a split holds are served by further, reshuffled epochs.
        create_attention_mask: add megatron's boolean [1, s, s] causal mask (True = masked) to each sample;
            default ``data_cfg.create_attention_mask``, else False (fused/SDPA attention builds its own).
        is_built_on_rank: megatron's hook; default: every rank builds (rank 0 first, others then hit the cache).

    Unweighted lists of several prefixes are blended in proportion to their token counts, so that the
    requested sample counts are honoured (megatron alone would cap them at one pass over each prefix).
    Works with or without an initialised torch.distributed process group; call it on every rank.
    """
    if len(num_samples) != 3:
        raise DataError(f"num_samples {tuple(num_samples)} must give (train, valid, test) sample counts")
    if any(n is not None and (not isinstance(n, int) or n < 0) for n in num_samples):
        raise DataError(f"num_samples {tuple(num_samples)} must be non-negative integers or None")
    if seq_length < 1:
        raise DataError(f"seq_length {seq_length} must be >= 1")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from mtpd_megatron.data.tokenizer import load_tokenizer

        path = tokenizer if tokenizer is not None else _get(data_cfg, "tokenizer")
        if not path:
            raise DataError("no tokenizer given; set data.tokenizer to a tokenizer.json from tools/train_tokenizer.py")
        tokenizer = load_tokenizer(path)

    prefixes, weights = parse_paths(_get(data_cfg, "paths"))
    split = str(_get(data_cfg, "split", "949,50,1"))
    matrix = _split_matrix(split)
    infos = [validate_indexed_dataset(p, vocab_size=tokenizer.vocab_size) for p in prefixes]
    _check_splits(infos, matrix, split, num_samples)
    if len(prefixes) > 1 and any(n is None for n, m in zip(num_samples, matrix) if m is not None):
        raise DataError(
            f"num_samples {tuple(num_samples)} has None (one pass) for a blend of several "
            f"prefixes; give every split a sample count"
        )
    if weights is None and len(prefixes) > 1:
        weights = [float(info.num_tokens) for info in infos]

    cache_dir = _get(data_cfg, "cache_dir") or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create the dataset cache {cache_dir} ({err.strerror}); set data.cache_dir to a writable directory"
        )
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"the dataset cache {cache_dir} is not writable; set data.cache_dir to a writable directory")

    ensure_megatron_importable()
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if create_attention_mask is None:
        create_attention_mask = bool(_get(data_cfg, "create_attention_mask", False))
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=bool(_get(data_cfg, "reset_position_ids", False)),
        reset_attention_mask=bool(_get(data_cfg, "reset_attention_mask", False)),
        eod_mask_loss=bool(_get(data_cfg, "eod_mask_loss", False)),
        create_attention_mask=create_attention_mask,
        mid_level_dataset_surplus=float(_get(data_cfg, "mid_level_dataset_surplus", 0.005)),
    )
    # A split asked for 0 samples is not built at all (megatron would otherwise build a full epoch).
    config.split_matrix = [m if n != 0 else None for m, n in zip(config.split_matrix, num_samples)]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config)
    train, valid, test = builder.build()
    return train, valid, test


def _check_splits(
    infos: Sequence[IndexedInfo],
    matrix: Sequence[Optional[tuple[float, float]]],
    split: str,
    num_samples: Sequence[Optional[int]],
) -> None:
    """Refuse splits that would hold no document (megatron would loop forever looking for tokens)."""
    for info in infos:
        n = info.num_sequences
        for name, bookends, samples in zip(SPLIT_NAMES, matrix, num_samples):
            if bookends is None or samples == 0:
                continue
            docs = int(round(bookends[1] * n)) - int(round(bookends[0] * n))
            if docs <= 0:
                raise DataError(
                    f"data.split {split!r} leaves the {name} split of {info.prefix} with no documents (it has "
                    f"{n}); give that split a larger share, 0 to drop it, or ask 0 {name} samples"
                )


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


class PretrainingSampler(Sampler[list[int]]):
    """Megatron-LM's ``MegatronPretrainingSampler``: sequential global batches, this rank's slice of each.

    ``consumed_samples`` counts samples over all data-parallel ranks, as in Megatron checkpoints; iteration
    starts right after them, which is what makes a resumed run see exactly the batches it had not seen.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, {dp_rank}, {dp_size}"
            )
        if total_samples < 0 or not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"consumed_samples {consumed_samples} is beyond the dataset's {total_samples} samples; "
                f"build the datasets with more samples (num_samples) to resume this run"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_micro_batch = micro_batch_size * dp_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        return full + (1 if rest > self.dp_rank * self.micro_batch_size and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.dp_rank * self.micro_batch_size
        batch: list[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.global_micro_batch:
                yield batch[start : start + self.micro_batch_size]
                batch = []
        if batch and not self.drop_last and batch[start : start + self.micro_batch_size]:
            yield batch[start : start + self.micro_batch_size]


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the model inputs; drop bookkeeping keys (a blend's ``dataset_id``) so every source batches alike."""
    keys = [k for k in BATCH_KEYS if k in samples[0] and samples[0][k] is not None]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def build_dataloader(
    dataset: Dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    num_workers: int = 0,
    *,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader over ``dataset`` for one data-parallel rank, resuming after ``consumed_samples``.

    Batches are dicts of tensors: ``tokens``, ``labels`` (tokens shifted left by one), ``loss_mask``,
    ``position_ids`` (all [micro_batch_size, seq_length]) and, if the dataset makes it, ``attention_mask``
    ([micro_batch_size, 1, seq, seq], True = masked). Deterministic for any ``num_workers``.
    """
    sampler = PretrainingSampler(
        len(dataset),
        consumed_samples,
        micro_batch_size,
        dp_rank,
        dp_size,  # type: ignore[arg-type]
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        persistent_workers=num_workers > 0,
    )
