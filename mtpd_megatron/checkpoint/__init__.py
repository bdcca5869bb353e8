"""Atomic, reshardable torch_dist checkpoints of the whole training state (see manager.py, layout.py)."""

from mtpd_megatron.checkpoint.layout import CheckpointError, complete_checkpoints, iter_dir_name, read_meta, verify
from mtpd_megatron.checkpoint.manager import CheckpointManager, TrainState

__all__ = [
    "CheckpointError", "CheckpointManager", "TrainState", "complete_checkpoints", "iter_dir_name", "read_meta",
    "verify",
]
