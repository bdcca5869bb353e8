"""Join the job's process group and build megatron's model-parallel groups from `cfg.parallel`.

Works under the two launchers we support, without flags:
* torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set for every worker;
* srun (one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT come from the
  batch script (slurm/), else the first host of SLURM_JOB_NODELIST and a port derived from the job id.
A plain `python -m mtpd_megatron.train` is a world of one.

GPU: NCCL, one device per local rank. CPU (tests, the demo): gloo, and megatron's CUDA assumptions answered
by `cpu_compat` — switched on here, before megatron is used, and only when the run's device is the CPU.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mtpd_megatron.config.schema import Config


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun, slurm or single


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def read_env(environ=None) -> DistEnv:
    """torchrun's variables win over Slurm's (torchrun inside an allocation sets both)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _first_slurm_host(),
            int(env.get("MASTER_PORT") or 20000 + job % 40000),
            "slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0) or 0), "single")


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("training.device=cuda but no GPU is visible (use training.device=auto or cpu)")
    return torch.device("cuda")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config, env: DistEnv, timeout_minutes: int = 30) -> torch.device:
    """Init the default process group, megatron's parallel groups and the seeds; return the device."""
    device = resolve_device(cfg.training.device)
    if device.type == "cpu":
        from mtpd_megatron.parallel import cpu_compat

        cpu_compat.enable()
        backend = "gloo"
    else:
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    if not dist.is_initialized():
        port = env.master_port or (free_port() if env.world_size == 1 else 29500)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=torch.device("cuda", env.local_rank) if backend == "nccl" else None,  # NCCL: no guessing
        )
    from megatron.core import parallel_state

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(cfg.training.seed)
    return device


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage; megatron's tracker for TP/EP regions.

    The default CPU generator is re-seeded last because on CPU the tracker's set-up runs through it
    (cpu_compat), and weight init with use_cpu_initialization draws from it: the same seed then gives the
    same full weights whatever the TP size.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def shutdown(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and (unless kept for a next run in this process) the process group."""
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if not keep_process_group:
        dist.destroy_process_group()


def spawn_local_ranks(nproc: int, module: str, argv: list) -> int:
    """Run `python -m module argv...` as `nproc` ranks on this machine (torchrun's own launcher, in-process)
    and return the ranks' exit code: 0, or the first failing rank's (2 user error, 3, 75 preempted).

    Why not tell users to type torchrun: when a rank exits with a user error, torchrun wraps its one-line
    message in a ~40-line ChildFailedError report and exits 1. Here the ranks' own line is all that is
    printed and their exit code is kept. OMP_NUM_THREADS defaults to the cores per rank (torchrun would set 1
    and warn about it).
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in ("torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(["--nproc-per-node", str(nproc), "--standalone", "-m", module, *argv])
    try:
        run(args)
    except ChildFailedError as failed:
        codes = [f.exitcode for _, f in sorted(failed.failures.items())]
        return next((c for c in codes if c not in (0, None) and c > 0), 1)
    return 0
