"""A stand-in trainer for the Slurm tests: same CLI, environment and checkpoint/exit contract as the real one.

It is a real torch.distributed (gloo) program: every rank reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT, joins the process group, all-reduces (rank + 1) and writes what it saw to
``<save>/probe/<tag>-rank<r>.json``. It then runs "steps" (a sleep each), resuming from
``<save>/latest_checkpointed_iteration.txt``; on SIGUSR1/SIGTERM all ranks agree (all_reduce MAX) to stop
after the current step, rank 0 writes the checkpoint, everyone meets at a barrier and exits 75.

Modes (the slurm scripts select them through MTPD_TRAIN_MODULE / MTPD_LOOPED_MODULE / MTPD_CONVERT_SCRIPT):

    python -m slurm_probe_trainer --config CFG [key=value ...]                     # pretraining
    python -m slurm_probe_trainer run-stage --config CFG --stage I [key=value ...]  # looped stage I
    python -m slurm_probe_trainer status --config CFG --stage I [key=value ...]     # 0 complete, 1 not
    python slurm_probe_trainer.py --ckpt DIR --out DIR                             # "conversion"

Config keys (YAML, dotted overrides): checkpoint.save, training.train_iters, probe.step_seconds.
A looped stage I trains in ``<checkpoint.save>/stage<I>`` for training.train_iters steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

EXIT_REQUEUE = 75
TRACKER = "latest_checkpointed_iteration.txt"


def load_config(path: str, overrides: list[str]) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override must be key=value, got {item!r}")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def read_iteration(save: Path) -> int:
    try:
        return int((save / TRACKER).read_text().strip())
    except FileNotFoundError:
        return 0


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(save: Path, train_iters: int, step_seconds: float, tag: str) -> int:
    import torch
    import torch.distributed as dist

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    total = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(total)

    save.mkdir(parents=True, exist_ok=True)
    start = read_iteration(save)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"),
        "node_rank": os.environ.get("NODE_RANK"),
        "hostname": socket.gethostname(),
        "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": os.environ["MASTER_PORT"],
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart_count": restart,
        "allreduce_sum": int(total.item()),
        "start_iteration": start,
        "start_time": time.time(),
        "env": {k: os.environ.get(k) for k in ("CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")},
    }
    probe_dir = save / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / f"{tag}-restart{restart}-rank{rank}.json").write_text(json.dumps(record, indent=1))
    if rank == 0:
        print(f"probe: world {world}, resuming at iteration {start} of {train_iters}", flush=True)

    it = start
    exit_code = 0
    while it < train_iters:
        time.sleep(step_seconds)
        it += 1
        if rank == 0:
            write_atomic(save / "progress.txt", str(it))
        flag = torch.tensor([1 if stop["signal"] else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and it < train_iters:
            exit_code = EXIT_REQUEUE
            break
    # Checkpoint: rank 0 writes the data then the tracker; nobody exits before it is on disk.
    if rank == 0:
        (save / f"iter_{it:07d}").mkdir(exist_ok=True)
        write_atomic(save / TRACKER, str(it))
        why = f"on {stop['signal']}" if exit_code else "at the end"
        print(f"probe: saved iteration {it} {why}; exit {exit_code}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--ckpt":  # conversion
        ap = argparse.ArgumentParser()
        ap.add_argument("--ckpt", required=True, type=Path)
        ap.add_argument("--out", required=True, type=Path)
        args = ap.parse_args(argv)
        iteration = read_iteration(args.ckpt)
        if not iteration:
            print(f"no complete checkpoint in {args.ckpt}", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.json").write_text(json.dumps({"source": str(args.ckpt), "iteration": iteration}))
        return 0

    mode = argv[0] if argv and argv[0] in ("run-stage", "status") else "train"
    ap = argparse.ArgumentParser(prog="slurm_probe_trainer")
    ap.add_argument("--config", required=True)
    if mode != "train":
        ap.add_argument("--stage", required=True, type=int)
    args, overrides = ap.parse_known_args(argv[1:] if mode != "train" else argv)
    cfg = load_config(args.config, overrides)
    save = Path(cfg["checkpoint"]["save"])
    iters = int(cfg.get("training", {}).get("train_iters", 10))
    step_seconds = float(cfg.get("probe", {}).get("step_seconds", 0.5))

    if mode == "train":
        return train(save, iters, step_seconds, tag="train")
    stage_dir = save / f"stage{args.stage}"
    complete = read_iteration(stage_dir) >= iters
    if mode == "status":
        print(f"stage {args.stage} {'complete' if complete else 'not complete'}")
        return 0 if complete else 1
    if complete:
        print(f"stage {args.stage} already complete")
        return 0
    return train(stage_dir, iters, step_seconds, tag=f"stage{args.stage}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
