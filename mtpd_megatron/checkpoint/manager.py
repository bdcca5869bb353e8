"""Save and load the whole training state through megatron-core `dist_checkpointing` (torch_dist).

What is saved: the model's and the optimizer's sharded state dicts, the LR scheduler, the training position
(iteration, consumed samples, skipped steps), every rank's RNG states (Python, NumPy, torch CPU/CUDA and
megatron's tracker) and a metadata JSON (config, stage, megatron-core version, vocabulary size, layout).

Loading builds the sharded state dict from the *current* model and optimizer, so torch_dist reshards: a
checkpoint written at TP2/EP2 resumes at TP1/EP1 and back. The DistributedOptimizer uses megatron's
`fully_reshardable` format for that reason. RNG states are per rank and are restored only when the layout
is unchanged (as Megatron-LM does); weights, optimizer moments and the data position always are.

Saves are atomic (layout.py). With `checkpoint.async_save` the tensors are written by a forked process
(megatron's mcore async strategy); the rename to `iter_N` happens in the request's finalize step, which
runs before the next save starts and at exit (`finalize(blocking=True)`).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.checkpoint.layout import CheckpointError
from mtpd_megatron.checkpoint.optimizer_state import load_optimizer_state, prime_adam_state
from mtpd_megatron.config.load import config_to_dict
from mtpd_megatron.config.schema import Config
from mtpd_megatron.parallel import cpu_compat
from mtpd_megatron.parallel.cpu_compat import installed_megatron_version

FORMAT_VERSION = 1
# Fields whose change makes a checkpoint belong to another model (weight shapes or what the heads mean).
ARCHITECTURE_FIELDS = (
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size", "model.num_attention_heads",
    "model.num_query_groups", "model.kv_channels", "model.qk_layernorm", "model.tie_embeddings",
    "model.moe.num_experts", "model.moe.ffn_hidden_size", "model.moe.shared_expert_hidden_size",
    "model.moe.layer_freq", "mtp.num_heads",
)


@dataclasses.dataclass
class TrainState:
    """Where training is: restored from a checkpoint so that the data order and the schedule continue."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def layout_signature(cfg: Config) -> dict:
    p = cfg.parallel
    return {
        "world_size": dist.get_world_size(),
        "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
        "ep": p.expert_model_parallel_size, "etp": p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        "cp": p.context_parallel_size,
    }


def check_compatible(meta: dict, cfg: Config, vocab_size: int, padded_vocab_size: int, where: str) -> None:
    """A checkpoint of another model -> CheckpointError naming the first differing field."""
    saved = meta.get("config", {})
    current = config_to_dict(cfg)
    for field in ARCHITECTURE_FIELDS:
        a, b = _lookup(saved, field), _lookup(current, field)
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


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_metadata() -> dict:
    """What Megatron-LM passes to sharded_state_dict (fully reshardable DistributedOptimizer state)."""
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def _results_queue_without_server(async_save: bool) -> None:
    """Hand megatron's torch_dist writer a results queue that needs no helper process.

    By default the writer's results queue lives in a `multiprocessing.Manager` server process
    (strategies/filesystem_async.py:53-66), created at the first save. Slurm signals every process of a job
    step on preemption, so that server dies with SIGTERM and the save we are about to make fails. A sync
    save writes in this process (a thread-safe queue.Queue is enough); an async save writes in a forked
    child (a fork-inherited multiprocessing queue carries the results back).
    """
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = (multiprocessing.get_context("fork").Queue() if async_save
                                           else queue.Queue())


class CheckpointManager:
    """Saves to `cfg.checkpoint.save`; loads what `resolve_resume` picked. Collective: call on every rank."""

    def __init__(self, cfg: Config, *, vocab_size: int, padded_vocab_size: int, stage: str = "pretrain",
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.save_root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.stage = stage
        self.log = log
        self._async_queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        _results_queue_without_server(cfg.checkpoint.async_save)
        if self.save_root is not None and dist.get_rank() == 0:
            layout.remove_leftovers(self.save_root)

    # ------------------------------------------------------------------ state dict

    def _state_dict(self, model: list, optimizer, scheduler, state: TrainState, *, is_loading: bool,
                    with_rng: bool) -> dict:
        if len(model) != 1:
            raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported yet")
        md = sharded_metadata()
        model_sd = unwrap_model(model[0]).sharded_state_dict(metadata=md)  # GPTModel keys, as Megatron-LM
        with cpu_compat.optimizer_scope():  # the optimizer gathers its state with device='cuda' literals
            optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=md)
        sd = {
            "model": model_sd,
            "optimizer": optimizer_sd,
            "scheduler": scheduler.state_dict(),
            "train_state": dataclasses.asdict(state),
        }
        if with_rng:
            sd["rng_state"] = ShardedObject(
                "rng_state", _rng_state(), (dist.get_world_size(),),
                (dist.get_rank(),), replica_id=0,
            )
        return sd

    def _meta(self, state: TrainState) -> dict:
        return {
            "format": FORMAT_VERSION,
            "iteration": state.iteration,
            "consumed_samples": state.consumed_samples,
            "stage": self.stage,
            "megatron_core_version": installed_megatron_version(),
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "layout": layout_signature(self.cfg),
            "config": config_to_dict(self.cfg),
        }

    # ------------------------------------------------------------------ save

    def save(self, state: TrainState, model: list, optimizer, scheduler) -> None:
        """Write `iter_N` atomically (sync, or started in the background with async_save)."""
        if self.save_root is None:
            return
        self.finalize(blocking=True)  # at most one save in flight; the previous one is published first
        it = state.iteration
        if dist.get_rank() == 0:
            layout.prepare_tmp(self.save_root, it)
        dist.barrier()
        tmp = self.save_root / (layout.iter_dir_name(it) + ".tmp")
        sd = self._state_dict(model, optimizer, scheduler, state, is_loading=False, with_rng=True)
        meta = self._meta(state)
        publish = _Publisher(self.save_root, it, meta, self.cfg.checkpoint.keep_last, self.log)
        if self._async_queue is None:
            dist_checkpointing.save(sd, str(tmp), content_metadata={"mtpd_format": FORMAT_VERSION})
            publish()
        else:
            request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True, async_strategy="mcore",
                                              content_metadata={"mtpd_format": FORMAT_VERSION})
            request.add_finalize_fn(publish)
            self._async_queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> None:
        """Publish finished background saves (every rank must call; blocking waits for all of them)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._async_queue is not None:
            self._async_queue.close()
            self._async_queue = None

    # ------------------------------------------------------------------ load

    def resolve_resume(self, spec: str) -> Optional[Path]:
        """Pick the checkpoint to resume from on rank 0 and share the choice (None = start fresh)."""
        root = self.cfg.checkpoint.load or self.cfg.checkpoint.save
        choice: list = [None]
        if dist.get_rank() == 0:
            try:
                path = layout.resolve(spec, root, self.log)
                choice[0] = ("ok", str(path) if path else None)
            except CheckpointError as e:
                choice[0] = ("error", str(e))
        dist.broadcast_object_list(choice, src=0)
        kind, value = choice[0]
        if kind == "error":
            raise CheckpointError(value)
        return Path(value) if value else None

    def read_and_check(self, path: Path) -> dict:
        """The checkpoint's metadata, after checking it was written for this model (all ranks read it)."""
        meta = layout.read_meta(path)
        check_compatible(meta, self.cfg, self.vocab_size, self.padded_vocab_size, f"checkpoint {path}")
        return meta

    def load(self, path: Path, model: list, optimizer, scheduler) -> TrainState:
        meta = self.read_and_check(path)
        same_layout = meta.get("layout") == layout_signature(self.cfg)
        prime_adam_state(optimizer)
        sd = self._state_dict(model, optimizer, scheduler, TrainState(), is_loading=True, with_rng=same_layout)
        try:
            loaded = dist_checkpointing.load(sd, str(path))
        except Exception as e:  # CheckpointingException, shape mismatches from torch DCP, ...
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"checkpoint {path} could not be loaded into this model: {msg}") from None
        unwrap_model(model[0]).load_state_dict(loaded["model"], strict=True)
        load_optimizer_state(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        else:
            self.log(f"[checkpoint] layout changed ({meta.get('layout')} -> {layout_signature(self.cfg)}): "
                     "weights, optimizer and data position restored, RNG states re-seeded")
        state = TrainState(**loaded["train_state"])
        self.log(f"[checkpoint] resumed from {path} at iteration {state.iteration}")
        return state


class _Publisher:
    """Finalize step of a save: runs on every rank once all ranks' writes are done."""

    def __init__(self, root: Path, iteration: int, meta: dict, keep_last: int, log):
        self.root, self.iteration, self.meta, self.keep_last, self.log = root, iteration, meta, keep_last, log

    def __call__(self) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            final = layout.publish(self.root, self.iteration, self.meta, self.keep_last)
            self.log(f"[checkpoint] saved {final}")
        dist.barrier()
