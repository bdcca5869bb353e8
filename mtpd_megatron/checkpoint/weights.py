"""Model weights alone in and out of a torch_dist checkpoint (any saved TP/EP/PP), without optimizer state.

Loading: where training starts from weights without the optimizer state (a checkpoint imported from Hugging
Face, stage "hf_import", and the previous stage of a looped extension) and for inference/evaluation. It runs
before DDP and the optimizer exist, so nothing else has to be refreshed. The files are checked against their
digests first (integrity.json), and every failure, torch DCP's BaseException-derived CheckpointException
included, is one CheckpointError line.

Saving: tools/convert_from_hf.py (and tests) write a weights-only checkpoint in the trainer's own layout
(iter_N.tmp -> metadata -> integrity manifest -> rename, layout.publish), with metadata from
metadata.build_meta, so the CheckpointManager resumes from it like from its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.checkpoint.manager import FAILURES, one_line, sharded_metadata, verify_integrity_collective
from mtpd_megatron.checkpoint.metadata import FORMAT_VERSION, HF_IMPORT_STAGE, CheckpointError  # noqa: F401


def load_model_state(model, checkpoint: Path, keep: Optional[Callable[[str], bool]] = None) -> dict:
    """(every rank) The `model` part of the checkpoint, sharded for `model`'s layout: the keys accepted by
    `keep` (all by default). Any failure is one CheckpointError line."""
    sharded = model.sharded_state_dict(metadata=sharded_metadata())
    wanted = {k: v for k, v in sharded.items() if keep is None or keep(k)}
    try:
        return dist_checkpointing.load({"model": wanted}, str(checkpoint))["model"]
    except FAILURES as e:  # shape mismatches, missing keys, unreadable shards (CheckpointException)
        raise CheckpointError(
            f"checkpoint {checkpoint}: weights could not be loaded into this model: {one_line(e, 300)}"
        ) from None


def load_model_weights(
    model,
    checkpoint: Path,
    keep: Optional[Callable[[str], bool]] = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[str]:
    """(every rank) Load the keys accepted by `keep` (all by default); returns the model keys left as they were."""
    problem = verify_integrity_collective(Path(checkpoint), log)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {problem} (re-create it, or pick another)")
    loaded = load_model_state(model, checkpoint, keep)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    wrong = [k for k in missing if (keep is None or keep(k)) and not k.endswith("_extra_state")]
    if wrong or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint}: missing {wrong[:3]}, unexpected {unexpected[:3]}")
    return [k for k in missing if not k.endswith("_extra_state")]


def save_model_weights(model, root: Path, meta: dict) -> Path:
    """(collective) Write `root/iter_N` (N = meta["iteration"]) with the model's weights + metadata."""
    root = Path(root)
    it = meta["iteration"]
    if dist.get_rank() == 0:
        layout.prepare_tmp(root, it)
    dist.barrier()
    tmp = root / (layout.iter_dir_name(it) + ".tmp")
    sd = {"model": model.sharded_state_dict(metadata=sharded_metadata())}
    dist_checkpointing.save(sd, str(tmp), content_metadata={"mtpd_format": FORMAT_VERSION})
    dist.barrier()
    if dist.get_rank() == 0:
        layout.publish(root, it, meta, keep_last=0)
    dist.barrier()
    return root / layout.iter_dir_name(it)
