"""Looped extension CLI (launch like the trainer: torchrun or one srun task per GPU).

    python -m mtpd_megatron.looped run-stage --config CFG --stage I [overrides]   # train stage I
    python -m mtpd_megatron.looped run-chain --config CFG [overrides]             # every stage, in order
    python -m mtpd_megatron.looped status    --config CFG [--stage I]             # exit 0 complete, 1 not

A stage that is complete is never re-run ("stage I already complete", exit 0). A stage with a partial
checkpoint resumes from it; a stage without one starts from the previous stage's final checkpoint: the
weights are loaded, the new heads initialised (stage `init`), the main model and old heads frozen, and an
iteration-0 checkpoint is written first — the training-free extension, which tools/eval_acceptance.py can
evaluate next to the trained stage. Exit codes are the trainer's (0, 2, 3, 75).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from mtpd_megatron.cli import cli_parser
from mtpd_megatron.config.load import ConfigError, load_config

PROG = "python -m mtpd_megatron.looped"


def parse_args(argv):
    p = cli_parser(PROG, __doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run-stage", "status", "run-chain"):
        s = sub.add_parser(name)
        s.add_argument("--config", required=True)
        if name == "run-stage":
            s.add_argument("--stage", type=int, required=True)
        elif name == "status":
            s.add_argument("--stage", type=int, default=None, help="one stage (default: every stage)")
        s.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def _stage_plan(cfg, index: int):
    """(stage config, trained heads, prepare_model callable, extending?) for stage `index`."""
    from mtpd_megatron.looped import extend, stages

    st = stages.check_stage_index(cfg, index)
    scfg = stages.stage_config(cfg, index)
    trained = stages.trained_heads(cfg, index)
    if index == 0:
        return scfg, trained, None, False
    if not stages.is_complete(cfg, index - 1):
        raise ConfigError(f"--stage {index}: stage {index - 1} is not complete (run it first, or use run-chain)")
    prev_heads = stages.stages_of(cfg)[index - 1].heads
    extending = not stages.has_progress(cfg, index)
    prev_ckpt = stages.final_checkpoint(cfg, index - 1)

    def prepare(model):
        if extending:  # a resumed stage gets its weights from its own checkpoint
            extend.load_previous_weights(model, prev_ckpt, prev_heads)
            extend.init_new_heads(model, prev_heads, st.heads, st.init)
        extend.freeze(model, trained, st.freeze_main)

    return scfg, trained, prepare, extending


def run_stage(cfg, index: int, last: bool = True) -> int:
    from mtpd_megatron import train
    from mtpd_megatron.looped import stages

    if stages.is_complete(cfg, index):
        print(f"stage {index} already complete ({stages.final_checkpoint(cfg, index)})", flush=True)
        return 0
    scfg, trained, prepare, extending = _stage_plan(cfg, index)
    return train.run(
        scfg,
        resume="auto",
        stage=f"stage{index}",
        prepare_model=prepare,
        trained_heads=trained,
        save_initial=extending,
        keep_process_group=not last,
    )


def _user_error(error: Exception) -> int:
    from mtpd_megatron.train import _user_error as one_line

    return one_line(error, PROG)  # rank 0 prints it, exit code 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from mtpd_megatron.looped import stages

    try:
        cfg = load_config(args.config, args.overrides)
        count = len(stages.stages_of(cfg))
        if args.command == "status":
            which = range(count) if args.stage is None else [args.stage]
            done = []
            for index in which:
                stages.check_stage_index(cfg, index)
                done.append(stages.is_complete(cfg, index))
                print(f"stage {index}: {'complete' if done[-1] else 'not complete'} ({stages.stage_dir(cfg, index)})")
            return 0 if all(done) else 1
        indices = [args.stage] if args.command == "run-stage" else list(range(count))
        for index in indices:
            stages.check_stage_index(cfg, index)
        # Every stage, before the first one trains (a bad later stage would surface after hours).
        from mtpd_megatron.config.__main__ import tokenizer_vocab_size
        from mtpd_megatron.parallel.launch import read_env

        stages.validate_stages(cfg, read_env().world_size, tokenizer_vocab_size(cfg), environment=True)
    except ConfigError as e:
        return _user_error(e)
    for index in indices:
        try:
            code = run_stage(cfg, index, last=index == indices[-1])
        except ConfigError as e:
            return _user_error(e)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
