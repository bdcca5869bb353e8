"""Save and load the whole training state through megatron-core `dist_checkpointing` (torch_dist).

What is saved: the model's and the optimizer's sharded state dicts, the LR scheduler, the training position
(iteration, consumed samples, skipped steps), every rank's RNG states (Python, NumPy, torch CPU/CUDA and
megatron's tracker) and a metadata JSON (config, stage, megatron-core version, vocabulary size, layout).

Loading builds the sharded state dict from the *current* model and optimizer, so torch_dist reshards: a
checkpoint written at TP2/EP2 resumes at TP1/EP1 and back. The DistributedOptimizer uses megatron's
`fully_reshardable` format for that reason. RNG states are per rank and are restored only when the layout
is unchanged (as Megatron-LM does); weights, optimizer moments and the data position always are.

Saves are atomic (layout.py). Both kinds run megatron's own async save request: a sync save executes it
in place (what `dist_checkpointing.save` does internally), with `checkpoint.async_save` the tensors are
written by a forked process (megatron's mcore async strategy); the rename to `iter_N` happens in the
request's finalize step, which runs before the next save starts and at exit (`finalize(blocking=True)`).
Two steps are added to the request: the writer hashes the shard files it wrote (integrity.json, layout.py),
in the forked process for async saves, and a forked writer dies with its trainer (an orphan would keep
writing into a directory the next run reuses).

Failures. A save that fails (no space, quota, file-size limit, read-only, permissions, I/O) raises
`CheckpointSaveError` on every rank with one line and an exit code (2 for what the user can fix, 1 for other
I/O errors); the half-written `iter_N.tmp` is removed, the previous checkpoint is untouched. Rank-0-only
steps (creating the directory, writing metadata, publishing) report their outcome to every rank, so a
failure there does not leave the other ranks waiting in a barrier.

Loading verifies the checkpoint's digests first (spread over the ranks), then loads. Any failure (a digest
mismatch, torch DCP's `CheckpointException`, which is a BaseException, unpickling errors, shape errors)
makes `--resume auto` fall back to the next older checkpoint with one line saying why; an explicitly named
checkpoint is an error (exit 2). A checkpoint of another model is always an error, never a fallback.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.checkpoint.layout import CheckpointError
from mtpd_megatron.checkpoint.metadata import (  # noqa: F401 (check_compatible: re-exported)
    FORMAT_VERSION,
    build_meta,
    check_compatible,
    lookup,
)
from mtpd_megatron.checkpoint.optimizer_state import load_optimizer_state, prime_adam_state
from mtpd_megatron.config.schema import Config


@dataclasses.dataclass
class TrainState:
    """Where training is: restored from a checkpoint so that the data order and the schedule continue."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0

    @property
    def applied_steps(self) -> int:
        """Optimizer updates so far (iterations count skipped, non-finite steps too)."""
        return self.iteration - self.skipped_steps


def layout_signature(cfg: Config) -> dict:
    p = cfg.parallel
    return {
        "world_size": dist.get_world_size(),
        "tp": p.tensor_model_parallel_size,
        "pp": p.pipeline_model_parallel_size,
        "ep": p.expert_model_parallel_size,
        "etp": p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        "cp": p.context_parallel_size,
    }


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
        filesystem_async._results_queue = multiprocessing.get_context("fork").Queue() if async_save else queue.Queue()


# ---------------------------------------------------------------------------------------------------------
# Failures: one line, an exit code, the same on every rank
# ---------------------------------------------------------------------------------------------------------

# What every load/save attempt catches: ordinary errors and torch DCP's CheckpointException, which derives
# from BaseException (torch/distributed/checkpoint/api.py) and so escapes `except Exception`.
FAILURES = (Exception, CheckpointException)

EXIT_USER_ERROR = 2
EXIT_IO_ERROR = 1
# errno -> what it means for a checkpoint directory and the fix (exit code 2: the user can act on it).
_FIXABLE = {
    errno.ENOSPC: "no space left on device (free space, lower checkpoint.keep_last or point checkpoint.save "
    "at a larger file system)",
    errno.EDQUOT: "disk quota exceeded (free space or raise the quota of checkpoint.save's file system)",
    errno.EFBIG: "file too large for this file system or for the process's file-size limit (ulimit -f)",
    errno.EROFS: "read-only file system (point checkpoint.save at a writable directory)",
    errno.EACCES: "permission denied (make checkpoint.save writable or point it elsewhere)",
    errno.EPERM: "operation not permitted (make checkpoint.save writable or point it elsewhere)",
    errno.ENAMETOOLONG: "file name too long (use a shorter checkpoint.save path)",
    errno.ENOENT: "a file or directory vanished while saving (is something else cleaning checkpoint.save?)",
    errno.ENOTDIR: "a path component is not a directory (check checkpoint.save)",
}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


class CheckpointSaveError(CheckpointError):
    """A save failed; `exit_code` is 2 (fixable: space, quota, permissions) or 1 (other I/O errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Agreed(Exception):
    """A failure rank 0 classified and told every rank about (code, reason)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def _causes(exc: BaseException):
    """`exc`, its causes/contexts, and the per-rank exceptions a CheckpointException wraps."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            for wrapped in e.failures.values():
                todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)


def one_line(exc: BaseException, limit: int = 240) -> str:
    """The innermost useful message of `exc` on one line (a CheckpointException's text is a traceback)."""
    chosen = exc
    for e in _causes(exc):
        if not isinstance(e, CheckpointException):
            chosen = e
            break
    text = " ".join(str(chosen).split()) if not isinstance(chosen, CheckpointException) else "failed on another rank"
    return f"{type(chosen).__name__}: {text}"[:limit]


def classify(exc: BaseException) -> Optional[tuple[int, str]]:
    """(exit code, reason) from the errno inside a failed save's exception, or None when it holds none (other
    ranks of a failed torch DCP save only learn that it failed; some writers drop the errno)."""
    for e in _causes(exc):
        if isinstance(e, _Agreed):
            return e.code, e.reason
        number = e.errno if isinstance(e, OSError) else None
        if number is None:
            m = _ERRNO_TEXT.search(str(e)) if not isinstance(e, CheckpointException) else None
            number = int(m.group(1)) if m else None
        if number is not None:
            if number in _FIXABLE:
                return EXIT_USER_ERROR, _FIXABLE[number]
            return EXIT_IO_ERROR, f"I/O error: {os.strerror(number)} (errno {number}; check the file system)"
    return None


def diagnose_file_system(root: Path, needed: int) -> Optional[tuple[int, str]]:
    """Why writing under `root` fails, found by looking, for failures that lost their errno on the way.

    torch's zip writer reports a short write (no space, quota, file-size limit) as a RuntimeError
    "unexpected pos N vs M" without the errno (caffe2 inline_container.cc), so the classic cases are checked
    directly: the process's file-size limit, free space against what a checkpoint needs, and a small probe
    write (quota, read-only, permissions). None when nothing is wrong that way.
    """
    import resource
    import tempfile

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < max(needed, 1):
        return EXIT_USER_ERROR, (
            f"file too large for the process's file-size limit of {soft} bytes (ulimit -f; raise it)"
        )
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < max(needed, 1 << 20):
        return EXIT_USER_ERROR, f"{_FIXABLE[errno.ENOSPC]}; {free / 2**20:.1f} MiB free"
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".mtpd-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return classify(e)
    return None


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank returns its result or raises the same `_Agreed` failure."""
    outcome: list = [None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = fn()
            outcome = [("ok", None)]
        except FAILURES as e:
            outcome = [("error", classify(e) or (EXIT_IO_ERROR, f"I/O error: {one_line(e)}"))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise _Agreed(*value)
    return result


def _first(values: list) -> Any:
    return next((v for v in values if v is not None), None)


def all_ranks(value: Any) -> list:
    """Every rank's `value` (picklable), in rank order."""
    if dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def verify_integrity_collective(ckpt: Path, log: Callable[[str], None]) -> Optional[str]:
    """(every rank) Re-hash the files of `ckpt` against integrity.json, each rank a share of them.

    megatron's `verify_integrity_manifest` does the same check on rank 0 alone (the whole checkpoint read by
    one process); spreading it makes it cost about one rank's share. None when intact (or when the checkpoint
    predates checksums, which is logged); else the first problem found.
    """
    listing: list = [None]
    if dist.get_rank() == 0:
        try:
            files = layout.read_integrity(ckpt)
            listing = [("ok", None if files is None else sorted(files, key=lambda n: -_size(ckpt / n)))]
        except CheckpointError as e:
            listing = [("error", str(e))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(listing, src=0)
    kind, names = listing[0]
    if kind == "error":
        return names
    if names is None:
        log(f"[checkpoint] {ckpt} has no {layout.INTEGRITY_FILE} (written before checksums): not verified")
        return None
    mine = names[dist.get_rank() :: dist.get_world_size()]
    return _first(all_ranks(layout.integrity_problem(ckpt, mine)))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------------
# The integrity step of a save request
# ---------------------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """In megatron's forked writer: get SIGKILL when the trainer dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _hash_after_write(async_fn: Callable, tmp: Path, rank: int) -> Callable:
    """megatron's write function, then this rank's digests (in the process that wrote the files)."""
    trainer_pid = os.getpid()

    def write_then_hash(*args, **kwargs):
        if os.getpid() != trainer_pid:
            _die_with_parent(trainer_pid)
        async_fn(*args, **kwargs)
        layout.write_integrity_part(tmp, rank, layout.rank_shard_files(tmp, rank))

    return write_then_hash


def _agreed_metadata_json(tmp: Path) -> Callable:
    """megatron's metadata.json finalize step (serialization.py `metadata_finalize_fn`: rank 0 writes, then a
    barrier), with rank 0's outcome shared, so that a failed write stops every rank instead of leaving the
    others in the barrier."""

    def write_metadata_json():
        on_rank0(lambda: save_config(CheckpointingConfig("torch_dist", 1), str(tmp)))

    return write_metadata_json


class CheckpointManager:
    """Saves to `cfg.checkpoint.save`; loads what `resolve_resume` picked. Collective: call on every rank."""

    def __init__(
        self,
        cfg: Config,
        *,
        vocab_size: int,
        padded_vocab_size: int,
        stage: str = "pretrain",
        log: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.save_root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.stage = stage
        self.log = log
        self._async_queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self._in_flight: Optional[int] = None  # iteration of the async save not yet published
        self._fallbacks: list[Path] = []
        self.loaded_path: Optional[Path] = None
        _results_queue_without_server(cfg.checkpoint.async_save)
        if self.save_root is not None and dist.get_rank() == 0:
            layout.remove_leftovers(self.save_root)  # safe: this run holds the directory's lock (lock.py)

    # ------------------------------------------------------------------ state dict

    def _state_dict(
        self, model: list, optimizer, scheduler, state: TrainState, *, is_loading: bool, with_rng: bool
    ) -> dict:
        if len(model) != 1:
            raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported yet")
        md = sharded_metadata()
        model_sd = unwrap_model(model[0]).sharded_state_dict(metadata=md)  # GPTModel keys, as Megatron-LM
        optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=md)
        sd = {
            "model": model_sd,
            "optimizer": optimizer_sd,
            "scheduler": scheduler.state_dict(),
            "train_state": dataclasses.asdict(state),
        }
        if with_rng:
            sd["rng_state"] = ShardedObject(
                "rng_state",
                _rng_state(),
                (dist.get_world_size(),),
                (dist.get_rank(),),
                replica_id=0,
            )
        return sd

    def _meta(self, state: TrainState) -> dict:
        return build_meta(
            self.cfg,
            iteration=state.iteration,
            consumed_samples=state.consumed_samples,
            stage=self.stage,
            vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size,
            layout=layout_signature(self.cfg),
        )

    # ------------------------------------------------------------------ save

    def _prepare(self, iteration: int) -> None:
        """(rank 0) A fresh iter_N.tmp, after checking there is room for one more checkpoint like the last."""
        previous = layout.complete_checkpoints(self.save_root)
        self.save_root.mkdir(parents=True, exist_ok=True)
        if previous:
            needed = sum(_size(f) for f in previous[-1].iterdir())
            free = shutil.disk_usage(self.save_root).free
            if free < needed:
                raise _Agreed(
                    EXIT_USER_ERROR,
                    f"only {free / 2**20:.1f} MiB free but the last checkpoint took "
                    f"{needed / 2**20:.1f} MiB: {_FIXABLE[errno.ENOSPC]}",
                )
        layout.prepare_tmp(self.save_root, iteration)

    def save(self, state: TrainState, model: list, optimizer, scheduler) -> None:
        """Write `iter_N` atomically (sync, or started in the background with async_save)."""
        if self.save_root is None:
            return
        self.finalize(blocking=True)  # at most one save in flight; the previous one is published first
        it = state.iteration
        tmp = self.save_root / (layout.iter_dir_name(it) + ".tmp")
        try:
            on_rank0(lambda: self._prepare(it))
            sd = self._state_dict(model, optimizer, scheduler, state, is_loading=False, with_rng=True)
            request = dist_checkpointing.save(
                sd,
                str(tmp),
                async_sharded_save=True,
                async_strategy="mcore",
                content_metadata={"mtpd_format": FORMAT_VERSION},
            )
            if request.async_fn is not None:
                request = request._replace(async_fn=_hash_after_write(request.async_fn, tmp, dist.get_rank()))
            for i, fn in enumerate(request.finalize_fns):
                if getattr(fn, "__name__", "") == "metadata_finalize_fn":
                    request.finalize_fns[i] = _agreed_metadata_json(tmp)
            request.add_finalize_fn(
                _Publisher(self.save_root, it, self._meta(state), self.cfg.checkpoint.keep_last, self.log)
            )
            if self._async_queue is None:
                request.execute_sync()
            else:
                self._async_queue.schedule_async_request(request)
                self._in_flight = it
        except FAILURES as e:
            self._save_failed(it, e)

    def _save_failed(self, iteration: int, exc: BaseException) -> None:
        """Agree on one reason and exit code, remove the half-written directory, raise CheckpointSaveError."""
        verdict = classify(exc)
        if verdict is None and dist.get_rank() == 0:  # before the half-written directory is removed
            done = layout.complete_checkpoints(self.save_root)
            needed = sum(_size(f) for f in done[-1].iterdir()) if done else 0
            verdict = diagnose_file_system(self.save_root, needed)
        code, reason = _first(all_ranks(verdict)) or (EXIT_IO_ERROR, f"I/O error: {one_line(exc)}")
        kept = "no earlier checkpoint exists"
        if dist.get_rank() == 0:
            layout.discard_tmp(self.save_root, iteration)
            done = layout.complete_checkpoints(self.save_root)
            if done:
                kept = f"the last complete checkpoint {done[-1].name} is intact"
        if dist.get_world_size() > 1:
            dist.barrier()
        raise CheckpointSaveError(
            f"checkpoint.save {self.save_root}: saving iteration {iteration} failed: {reason}; {kept}", code
        ) from None

    def finalize(self, blocking: bool = False) -> None:
        """Publish finished background saves (every rank must call; blocking waits for all of them)."""
        if self._async_queue is None:
            return
        try:
            done = self._async_queue.maybe_finalize_async_calls(blocking=blocking)
        except FAILURES as e:
            it, self._in_flight = self._in_flight, None
            self._save_failed(it if it is not None else -1, e)
        if done and self._async_queue.get_num_unfinalized_calls() == 0:
            self._in_flight = None

    def close(self) -> None:
        if self._async_queue is not None:
            try:
                self.finalize(blocking=True)
            finally:
                self._async_queue.close(abort=True)  # nothing is left to finalize (or it failed)
                self._async_queue = None

    def abandon(self) -> None:
        """On the way out after an error: drop a background save without publishing it."""
        if self._async_queue is not None:
            self._async_queue.close(abort=True)
            self._async_queue = None

    # ------------------------------------------------------------------ load

    def resolve_resume(self, spec: str) -> Optional[Path]:
        """Pick the checkpoint to resume from on rank 0 and share the choice (None = start fresh).

        With `auto` (or a save directory) the older complete checkpoints are kept as fallbacks for `load`.
        """
        root = self.cfg.checkpoint.load or self.cfg.checkpoint.save
        choice: list = [None]
        if dist.get_rank() == 0:
            try:
                path = layout.resolve(spec, root, self.log)
                older = []
                if path is not None and (spec == "auto" or layout.iteration_of(Path(spec)) is None):
                    older = [
                        str(p)
                        for p in reversed(layout.complete_checkpoints(path.parent))
                        if layout.iteration_of(p) < layout.iteration_of(path)
                    ]
                choice[0] = ("ok", str(path) if path else None, older)
            except CheckpointError as e:
                choice[0] = ("error", str(e), [])
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        kind, value, older = choice[0]
        if kind == "error":
            raise CheckpointError(value)
        self._fallbacks = [Path(p) for p in older]
        return Path(value) if value else None

    def read_and_check(self, path: Path) -> dict:
        """The checkpoint's metadata, after checking it was written for this model (all ranks read it)."""
        meta = layout.read_meta(path)
        check_compatible(meta, self.cfg, self.vocab_size, self.padded_vocab_size, f"checkpoint {path}")
        return meta

    def load(self, path: Path, model: list, optimizer, scheduler) -> TrainState:
        """Load `path`, or (with fallbacks from resolve_resume) the newest older checkpoint that loads.

        Sets `loaded_path`. Raises CheckpointError (exit 2) for a checkpoint of another model, for a named
        checkpoint that fails, and when no candidate is left.
        """
        candidates = [Path(path)] + self._fallbacks
        for i, ckpt in enumerate(candidates):
            if i > 0:
                problem = on_rank0(lambda ckpt=ckpt: layout.verify(ckpt))
                if problem:
                    self.log(f"[checkpoint] skipping {ckpt}: {problem}")
                    continue
            meta = self.read_and_check(ckpt)
            problem = verify_integrity_collective(ckpt, self.log)
            verified = problem is None
            if problem is None:
                problem = self._load_one(ckpt, meta, model, optimizer, scheduler)
            if problem is None:
                self.loaded_path = ckpt
                state = self._loaded_state
                files = "integrity verified" if (ckpt / layout.INTEGRITY_FILE).exists() else "no checksums"
                self.log(f"[checkpoint] resumed from {ckpt} at iteration {state.iteration} ({files})")
                return state
            if not self._fallbacks:
                where = "the integrity check" if not verified else "loading it"
                raise CheckpointError(
                    f"--resume {ckpt}: {where} failed: {problem}; pick another checkpoint or use --resume auto"
                )
            self.log(f"[checkpoint] skipping {ckpt}: {problem}")
        raise layout.no_valid_checkpoint(Path(path).parent, "--resume")

    def _load_one(self, path: Path, meta: dict, model: list, optimizer, scheduler) -> Optional[str]:
        """(every rank) Load one checkpoint; None on success, else the agreed reason it failed."""
        same_layout = meta.get("layout") == layout_signature(self.cfg)
        if (
            lookup(meta.get("config", {}), "parallel.use_distributed_optimizer") is False
            and self.cfg.parallel.use_distributed_optimizer
        ):
            raise CheckpointError(
                f"checkpoint {path}: parallel.use_distributed_optimizer=true, but the checkpoint's optimizer state "
                "was written by the plain (non-distributed) optimizer, which the distributed one cannot load "
                "(resume with parallel.use_distributed_optimizer=false)"
            )
        fatal = failed = None
        try:
            prime_adam_state(optimizer)
            sd = self._state_dict(model, optimizer, scheduler, TrainState(), is_loading=True, with_rng=same_layout)
            loaded = dist_checkpointing.load(sd, str(path))
            unwrap_model(model[0]).load_state_dict(loaded["model"], strict=True)
            load_optimizer_state(optimizer, loaded["optimizer"])
            scheduler.load_state_dict(loaded["scheduler"])
            if same_layout:
                _set_rng_state(loaded["rng_state"])
            self._loaded_state = TrainState(**loaded["train_state"])
        except CheckpointError as e:  # the checkpoint is fine but does not fit this run (e.g. the layout)
            fatal = str(e)
        except FAILURES as e:  # damaged data, unpickling errors, shape mismatches, DCP's CheckpointException
            failed = f"could not be loaded ({one_line(e)})"
        verdicts = all_ranks((fatal, failed))
        fatal = _first([v[0] for v in verdicts])
        if fatal:
            raise CheckpointError(f"checkpoint {path}: {fatal}")
        failed = _first([v[1] for v in verdicts])
        if failed is None and not same_layout:
            self.log(
                f"[checkpoint] layout changed ({meta.get('layout')} -> {layout_signature(self.cfg)}): "
                "weights, optimizer and data position restored, RNG states re-seeded"
            )
        return failed


class _Publisher:
    """Finalize step of a save: runs on every rank once all ranks' writes are done."""

    def __init__(self, root: Path, iteration: int, meta: dict, keep_last: int, log):
        self.root, self.iteration, self.meta, self.keep_last, self.log = root, iteration, meta, keep_last, log

    def __call__(self) -> None:
        if dist.get_world_size() > 1:
            dist.barrier()
        final = on_rank0(lambda: layout.publish(self.root, self.iteration, self.meta, self.keep_last))
        if final is not None:
            self.log(f"[checkpoint] saved {final}")
