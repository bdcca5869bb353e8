"""Run a function on N local processes joined in a real gloo process group.

Tests use this to exercise megatron-core's tensor/expert parallel code paths on CPU. Each rank's return
value is sent back to the caller, so a test compares ranks against a single-process reference in the
parent process.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtpd_megatron.parallel.launch import free_port


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, kwargs: dict):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    if not torch.cuda.is_available():  # the CPU layer, entered once for this process (cpu_compat.py)
        from mtpd_megatron.parallel import cpu_compat

        cpu_compat.enable()
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = {"ok": True, "value": fn(*args, **kwargs)}
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:  # megatron may not be initialised by this test
                pass
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn: Callable, world_size: int, *args, **kwargs) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(*args, **kwargs)``; return the per-rank results.

    ``fn`` must be importable (module-level) because ranks are started with the spawn method.
    Raises RuntimeError carrying every failing rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args, kwargs),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    errors = [f"--- rank {r} ---\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [res["value"] for res in results]
