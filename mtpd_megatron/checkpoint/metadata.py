"""The checkpoint's own metadata file (mtpd_checkpoint.json): what it holds, its version, and the checks.

Every writer of a checkpoint (the trainer's CheckpointManager, tools/convert_from_hf.py) builds it with
`build_meta`, every reader (resume, inference, convert_to_hf, looped stages) reads it with `read_meta`, and
`check_compatible` decides whether a checkpoint belongs to the model of a config. One owner, so the writers
cannot drift apart and a reader's error is always the same one line.

Plain Python (no torch): `looped status` reads checkpoints without importing megatron.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mtpd_megatron.config.load import config_to_dict
from mtpd_megatron.config.schema import Config

META_FILE = "mtpd_checkpoint.json"
FORMAT_VERSION = 1  # bump when a reader of the previous version could not load the new files
HF_IMPORT_STAGE = "hf_import"  # checkpoints written by tools/convert_from_hf.py: weights, no optimizer state
# Fields whose change makes a checkpoint belong to another model (weight shapes or what the heads mean).
ARCHITECTURE_FIELDS = (
    "model.num_layers",
    "model.hidden_size",
    "model.ffn_hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.kv_channels",
    "model.qk_layernorm",
    "model.tie_embeddings",
    "model.moe.num_experts",
    "model.moe.ffn_hidden_size",
    "model.moe.shared_expert_hidden_size",
    "model.moe.layer_freq",
    "mtp.num_heads",
)


class CheckpointError(RuntimeError):
    """A user-facing checkpoint problem, one line (the CLI exits with code 2)."""


def build_meta(
    cfg: Config,
    *,
    iteration: int,
    stage: str,
    vocab_size: int,
    padded_vocab_size: int,
    layout: Optional[dict] = None,
    consumed_samples: int = 0,
    source: Optional[dict] = None,
) -> dict:
    """The metadata of a checkpoint of `cfg`'s model (the whole config travels with it)."""
    from mtpd_megatron.parallel.cpu_compat import installed_megatron_version

    meta = {
        "format": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "stage": stage,
        "megatron_core_version": installed_megatron_version(),
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "layout": layout,
        "config": config_to_dict(cfg),
    }
    if source:
        meta["source"] = source
    return meta


def meta_problem(ckpt: Path) -> tuple[Optional[dict], Optional[str]]:
    """(metadata, None), or (None, why it cannot be used) — for `layout.verify`, which skips such a checkpoint."""
    try:
        with open(Path(ckpt) / META_FILE) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{META_FILE} unreadable ({e.__class__.__name__})"
    if not isinstance(meta, dict) or "iteration" not in meta:
        return None, f"{META_FILE} has no iteration"
    version = meta.get("format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return None, (
            f"{META_FILE} has format {version!r}, newer than the {FORMAT_VERSION} this mtpd-megatron "
            "reads (update mtpd-megatron)"
        )
    return meta, None


def read_meta(ckpt: Path) -> dict:
    """The checkpoint's metadata; CheckpointError (one line) when it is missing, damaged or too new."""
    meta, problem = meta_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt}: {problem}")
    return meta


def lookup(tree: dict, dotted: str):
    """`tree["a"]["b"]` for "a.b" (None where a level is missing)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_compatible(meta: dict, cfg: Config, vocab_size: int, padded_vocab_size: int, where: str) -> None:
    """A checkpoint of another model -> CheckpointError naming the first differing field."""
    saved = meta.get("config", {})
    current = config_to_dict(cfg)
    for field in ARCHITECTURE_FIELDS:
        a, b = lookup(saved, field), lookup(current, field)
        if a != b:
            raise CheckpointError(
                f"{where} belongs to another model: {field} is {a!r} in the checkpoint but {b!r} in the config "
                f"(use the checkpoint's config, or --resume none / another checkpoint.save directory)"
            )
    if meta.get("vocab_size") != vocab_size:
        raise CheckpointError(
            f"{where} belongs to another model: vocabulary size {meta.get('vocab_size')} in the checkpoint but "
            f"{vocab_size} for data.tokenizer (use the tokenizer the checkpoint was trained with)"
        )
    if meta.get("padded_vocab_size") != padded_vocab_size:
        raise CheckpointError(
            f"{where}: padded vocabulary {meta.get('padded_vocab_size')} in the checkpoint but {padded_vocab_size} "
            f"at this TP size (set model.make_vocab_size_divisible_by so that both layouts pad alike)"
        )
