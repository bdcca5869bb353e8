"""Load only the model weights of a torch_dist checkpoint into a bare GPTModel (any saved TP/EP/PP).

Used where training starts from weights without the optimizer state: a checkpoint imported from Hugging Face
(tools/convert_from_hf.py, stage "hf_import") and the previous stage of a looped extension. It runs before
DDP and the optimizer exist, so nothing else has to be refreshed. The files are checked against their
digests first (integrity.json), and every failure, torch DCP's BaseException-derived CheckpointException
included, is one CheckpointError line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megatron.core import dist_checkpointing

from mtpd_megatron.checkpoint.layout import HF_IMPORT_STAGE, CheckpointError  # noqa: F401 (re-exported)
from mtpd_megatron.checkpoint.manager import FAILURES, one_line, sharded_metadata, verify_integrity_collective


def load_model_weights(model, checkpoint: Path, keep: Optional[Callable[[str], bool]] = None,
                       log: Callable[[str], None] = lambda line: None) -> list[str]:
    """(every rank) Load the keys accepted by `keep` (all by default); returns the model keys left as they were."""
    problem = verify_integrity_collective(Path(checkpoint), log)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {problem} (re-create it, or pick another)")
    sharded = model.sharded_state_dict(metadata=sharded_metadata())
    wanted = {k: v for k, v in sharded.items() if keep is None or keep(k)}
    try:
        loaded = dist_checkpointing.load({"model": wanted}, str(checkpoint))
    except FAILURES as e:  # shape mismatches, missing keys, unreadable shards (CheckpointException)
        raise CheckpointError(f"checkpoint {checkpoint}: weights could not be loaded into this model: "
                              f"{one_line(e, 300)}") from None
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    wrong = [k for k in missing if (keep is None or keep(k)) and not k.endswith("_extra_state")]
    if wrong or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint}: missing {wrong[:3]}, unexpected {unexpected[:3]}")
    return [k for k in missing if not k.endswith("_extra_state")]
