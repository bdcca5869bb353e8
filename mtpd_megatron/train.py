"""Pretraining entry point: `python -m mtpd_megatron.train --config CFG [section.key=value ...] [--resume R]`.

On one machine `--nproc-per-node N` starts N ranks itself (checking the config first, so a mistake is one
line and exit 2 before any rank starts); torchrun (`torchrun --nproc-per-node N -m mtpd_megatron.train ...`)
and one srun task per GPU work too: the rank layout comes from the environment (parallel/launch.py). `--resume auto` (the default, also
`checkpoint.resume`) continues from the newest complete checkpoint under checkpoint.load/save, `none`
starts fresh, a directory resumes from that checkpoint.

Exit codes:
  0   training finished
  1   a checkpoint could not be written for an I/O error (one line; the previous checkpoint is intact)
  2   user error: config, data/tokenizer, checkpoint, a checkpoint directory another trainer holds, or a
      save that failed for space, quota or permissions (one line on stderr; nothing written, or the
      previous checkpoint intact)
  3   training.max_consecutive_nan_steps non-finite losses in a row, or a run that ends on non-finite steps
  75  EXIT_PREEMPTED: SIGTERM/SIGUSR1 (or Ctrl-C) received; the step finished, a checkpoint was saved; requeue
      (srun passes it through; torchrun reports any non-zero child as its own failure)
  130 a second Ctrl-C: stopped at once without saving (one line; the last checkpoint is intact)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mtpd_megatron.cli import TRAIN_PROG, cli_parser, report_error
from mtpd_megatron.config.load import ConfigError, load_config

EXIT_PREEMPTED = 75  # also mtpd_megatron.trainer.EXIT_PREEMPTED


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = cli_parser(TRAIN_PROG, __doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny_dense.yaml")
    p.add_argument("--resume", default=None, help="auto | none | checkpoint directory (default: checkpoint.resume)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start this many ranks on this machine (instead of torchrun); the config is checked first",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides such as training.train_iters=100")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _user_error(e)
    if args.nproc_per_node is not None:
        return _launch(args, cfg)
    return run(cfg, resume=args.resume or cfg.checkpoint.resume)


def _launch(args, cfg) -> int:
    """`--nproc-per-node N`: check everything a user can get wrong once, here, then start the N ranks."""
    import os

    from mtpd_megatron.parallel import launch

    if args.nproc_per_node < 1:
        return _user_error(ValueError(f"--nproc-per-node {args.nproc_per_node}: must be >= 1"))
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return _user_error(ValueError("--nproc-per-node starts the ranks itself: drop it under torchrun or srun"))
    try:
        _check(cfg, args.nproc_per_node)
    except (ConfigError, ValueError) as e:
        return _user_error(e)
    rank_argv = ["--config", args.config, *(["--resume", args.resume] if args.resume else []), *args.overrides]
    return launch.spawn_local_ranks(args.nproc_per_node, "mtpd_megatron.train", rank_argv)


def _check(cfg, world_size: int):
    """Everything checkable before a process group exists: the config against the world size, the
    tokenizer, the device. Returns (tokenizer, device)."""
    from mtpd_megatron.config.validate import validate
    from mtpd_megatron.data import load_tokenizer
    from mtpd_megatron.parallel import launch

    validate(cfg, world_size, environment=True)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: not set (give the tokenizer.json the data was preprocessed with)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    validate(cfg, world_size, vocab_size=tokenizer.vocab_size)
    return tokenizer, launch.resolve_device(cfg.training.device)


def _user_error(error: Exception, prog: str = TRAIN_PROG) -> int:
    from mtpd_megatron.parallel.launch import read_env

    if read_env().rank == 0:  # every rank finds the same problem; one of them says it
        report_error(prog, error)
    return 2


def run(
    cfg,
    *,
    resume: str = "auto",
    stage: str = "pretrain",
    prepare_model=None,
    trained_heads=None,
    save_initial: bool = False,
    keep_process_group: bool = False,
) -> int:
    """Validate, join the process group, build the Trainer, train; the exit code. Also used by looped/:
    `prepare_model`/`trained_heads` (see Trainer), `save_initial` (iteration-0 checkpoint when fresh),
    `keep_process_group` (the next stage of a chain runs in this process)."""
    from mtpd_megatron.logging_utils import quiet_known_noise

    quiet_known_noise()
    from mtpd_megatron.checkpoint.layout import CheckpointError
    from mtpd_megatron.data import DataError
    from mtpd_megatron.parallel import launch

    try:  # 1. Everything a user can get wrong is checked before any process group exists.
        env = launch.read_env()
        tokenizer, device = _check(cfg, env.world_size)
    except (ConfigError, DataError, ValueError) as e:
        return _user_error(e)

    from mtpd_megatron.checkpoint import lock
    from mtpd_megatron.checkpoint.manager import CheckpointSaveError
    from mtpd_megatron.trainer import Preemption, Trainer

    preemption = Preemption().install()  # before the (slow) set-up: a signal then stops after step one
    launch.init_distributed(cfg, env)
    run_lock = None
    try:  # 2. Hold the checkpoint directory, build (data and checkpoint errors are still user errors), train.
        run_lock = lock.acquire_collective(cfg.checkpoint.save, log=_rank0_print)
        trainer = Trainer(
            cfg,
            tokenizer,
            device,
            resume=resume,
            preemption=preemption,
            stage=stage,
            prepare_model=prepare_model,
            trained_heads=trained_heads,
        )
        if save_initial:
            trainer.save_initial()
        return trainer.fit()
    except CheckpointSaveError as e:
        _user_error(e)
        return e.exit_code
    except (ConfigError, DataError, CheckpointError) as e:
        return _user_error(e)
    except KeyboardInterrupt:
        _user_error(
            RuntimeError(
                "interrupted by a second Ctrl-C: the step in flight is not saved; the last "
                "complete checkpoint is intact (resume with --resume auto)"
            )
        )
        return 130
    finally:
        if run_lock is not None:
            run_lock.release()
        launch.shutdown(keep_process_group)


def _rank0_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
