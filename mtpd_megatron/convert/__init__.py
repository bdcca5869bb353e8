"""Checkpoint conversion between megatron torch_dist checkpoints and Hugging Face model directories.

    to_hf.py          torch_dist (any TP/EP/PP) -> safetensors + config.json for a stock transformers class
    from_hf.py        the reverse, to a checkpoint the CheckpointManager's layout and metadata describe
    mapping.py        which HF class expresses a config exactly, parameter names and tensor transforms
    mtp_heads.py      where an export keeps its MTP heads (sidecar mtp/, inline, none) and re-attaching them
                      after a Hugging Face fine-tune (tools/attach_mtp_heads.py)

Drafting with the exported heads in transformers is inference/hf_mtp.py (shipped in each export as
custom_generate/generate.py).

This module holds the plumbing both directions share: the one-line error type (CLIs exit 2 on it), the
output directory that appears only when complete, and a one-process megatron "world" (gloo, TP=EP=PP=1)
that megatron's model construction needs even when no collective ever runs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


class ConvertError(ValueError):
    """A user error (bad input, inexpressible config): one line naming the file/field and the fix."""


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `OUT.tmp-XXXX` next to `out`; rename it to `out` only when the block succeeds.

    On any exception (or Ctrl-C) the temporary directory is removed, so no partial output is ever left.
    """
    from mtpd_megatron.checkpoint.atomic import atomic_dir

    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConvertError(f"--out {out} already exists (remove it or pass --overwrite)")
    with atomic_dir(out) as tmp:  # --overwrite: the old one is moved aside, then deleted after the rename
        yield tmp


@contextlib.contextmanager
def megatron_world() -> Iterator[None]:
    """A gloo world of one process with megatron's parallel state at TP=EP=PP=1.

    Reuses an existing world of size 1 (tests call the converters inside a spawned rank); everything this
    context created is torn down on exit so that it can be entered again in the same process.
    """
    import torch
    import torch.distributed as dist

    from mtpd_megatron.parallel import cpu_compat

    if not torch.cuda.is_available():
        cpu_compat.enable()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created_pg = created_ps = False
    if not dist.is_initialized():
        from mtpd_megatron.parallel.launch import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        created_pg = True
    elif dist.get_world_size() != 1:
        raise ConvertError("conversion runs in one process; call it outside a multi-rank job")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        created_ps = True
    try:
        model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        if created_ps:
            parallel_state.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


def check_finite(name: str, tensor, where: str, allow: bool) -> None:
    """Refuse a tensor with NaN/inf values (a diverged or damaged model converts into a useless one that
    loads without complaint); `allow` is the --allow-nonfinite flag."""
    import torch

    if allow or not tensor.is_floating_point():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ConvertError(
            f"{name} in {where} has {bad} non-finite value(s) (NaN/inf) of {tensor.numel()}: the "
            "model is damaged or diverged (convert another checkpoint, or pass --allow-nonfinite "
            "to convert it anyway)"
        )


def cli_parser(prog: str, description: str):
    """The converters' argparse: a usage error is one line and exit code 2 (mtpd_megatron.cli's parser)."""
    from mtpd_megatron.cli import cli_parser as one_line_parser

    return one_line_parser(prog, description)


__all__ = ["ConvertError", "atomic_output_dir", "check_finite", "cli_parser", "megatron_world"]
