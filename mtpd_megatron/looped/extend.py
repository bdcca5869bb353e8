"""Grow a model's MTP heads from m to m': load the previous stage's weights, initialise the new heads, freeze.

All of it runs on the bare GPTModel of each rank before DDP wraps it (frozen parameters then get no grad
buffer and no optimizer state), at any TP/EP/PP: the previous stage's torch_dist checkpoint is loaded
through the current model's sharded state dict (torch_dist reshards), and head copies are shard-local
(every head's shard has the same layout on a rank).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from mtpd_megatron.checkpoint.weights import load_model_weights

_HEAD_KEY = re.compile(r"^mtp\.layers\.(\d+)\.")


def head_of(key: str):
    """Index of the MTP head a state-dict key belongs to, or None for the main model."""
    m = _HEAD_KEY.match(key)
    return int(m.group(1)) if m else None


def load_previous_weights(model, checkpoint: Path, prev_heads: int) -> None:
    """Load the main model and heads 0..prev_heads-1 from `checkpoint` (a previous stage's, any layout)."""
    load_model_weights(model, checkpoint, keep=lambda key: head_of(key) is None or head_of(key) < prev_heads)


@torch.no_grad()
def init_new_heads(model, prev_heads: int, new_heads: int, init: str) -> None:
    """copy: head m+j <- head j (the paper); repeat-last: every new head <- head m-1; random: keep the init."""
    if init == "random":
        return
    layers = model.mtp.layers
    for target in range(prev_heads, new_heads):
        source = (target - prev_heads) % prev_heads if init == "copy" else prev_heads - 1
        for dst, src in zip(layers[target].parameters(), layers[source].parameters(), strict=True):
            dst.copy_(src)
        for dst, src in zip(layers[target].buffers(), layers[source].buffers(), strict=True):
            dst.copy_(src)


def freeze(model, trained: Iterable[bool], freeze_main: bool) -> None:
    """requires_grad=False for the main model (if asked) and untrained heads; MoE routers of frozen layers
    keep their expert bias fixed (megatron updates it regardless of requires_grad,
    distributed/finalize_model_grads.py:354, unless `frozen_expert_bias` is set)."""
    trained = tuple(trained)
    for name, module in model.named_modules():
        head = head_of(name + ".")
        frozen = (not trained[head]) if head is not None else freeze_main
        if frozen and hasattr(module, "expert_bias"):
            module.frozen_expert_bias = True
    for name, param in model.named_parameters():
        head = head_of(name)
        frozen = (not trained[head]) if head is not None else freeze_main
        if frozen:
            param.requires_grad_(False)
