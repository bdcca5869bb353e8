"""Atomic, reshardable torch_dist checkpoints of the whole training state (see manager.py, layout.py).

`layout` (paths, metadata, verification) is plain Python; the manager needs megatron-core and is imported on
first use, so that tools which only read checkpoint directories (`looped status`) start instantly.
"""

from typing import Any

from mtpd_megatron.checkpoint.layout import CheckpointError, complete_checkpoints, iter_dir_name, read_meta, verify

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "TrainState",
    "complete_checkpoints",
    "iter_dir_name",
    "read_meta",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in ("CheckpointManager", "TrainState"):
        from mtpd_megatron.checkpoint import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
