"""Stages of a looped extension: their configs, directories and completion state.

A config's `looped.stages` lists the stages in order. Stage 0 trains from scratch with `heads` MTP heads
(nothing frozen). Stage i > 0 grows the heads from stages[i-1].heads = m to stages[i].heads = m', starting
from stage i-1's final checkpoint, and trains with the main model and the old heads frozen (by default).
Each stage has its own checkpoint directory `<root>/stage_<i>_heads_<m'>/` holding ordinary checkpoints of
the trainer; a stage is complete when that directory holds a valid checkpoint at its last iteration.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Optional

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.config.load import ConfigError, _build
from mtpd_megatron.config.schema import Config, StageConfig

INITS = ("copy", "repeat-last", "random")


def stages_of(cfg: Config) -> list[StageConfig]:
    """The typed, checked stage list (ConfigError: one line naming the field and the fix)."""
    raw = cfg.looped.stages
    if not raw:
        raise ConfigError("looped.stages: empty (list the stages, e.g. [{heads: 1}, {heads: 2}, {heads: 4}])")
    stages = []
    for i, item in enumerate(raw):
        where = f"looped.stages[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{heads: 2, train_iters: 100}}")
        st = _build(StageConfig, item, where)
        if st.heads < 1:
            raise ConfigError(f"{where}.heads: must be >= 1")
        if st.init not in INITS:
            raise ConfigError(f"{where}.init: {st.init!r} is not one of {', '.join(INITS)}")
        if st.train_iters < 1:
            raise ConfigError(f"{where}.train_iters: must be >= 1")
        if i and st.heads <= stages[-1].heads:
            raise ConfigError(f"{where}.heads: {st.heads} must be larger than the previous stage's {stages[-1].heads}")
        stages.append(st)
    return stages


def check_stage_index(cfg: Config, index: int) -> StageConfig:
    stages = stages_of(cfg)
    if not 0 <= index < len(stages):
        raise ConfigError(f"--stage {index}: the config has stages 0..{len(stages) - 1}")
    return stages[index]


def stages_root(cfg: Config) -> Path:
    root = cfg.looped.root or cfg.checkpoint.save
    if not root:
        raise ConfigError("looped.root: not set (nor checkpoint.save): give the directory for the stage checkpoints")
    return Path(root)


def stage_dir(cfg: Config, index: int) -> Path:
    return stages_root(cfg) / f"stage_{index}_heads_{stages_of(cfg)[index].heads}"


def stage_config(cfg: Config, index: int) -> Config:
    """The trainer config of one stage: its heads, budget, schedule and checkpoint directory."""
    st = check_stage_index(cfg, index)
    c = copy.deepcopy(cfg)
    c.name = f"{cfg.name}-stage{index}"
    c.mtp.num_heads = st.heads
    t = c.training
    t.train_iters = st.train_iters
    for field in ("lr", "min_lr", "lr_warmup_iters", "lr_schedule"):
        value = getattr(st, field)
        if value is not None:
            setattr(t, field, value)
    c.checkpoint.save = str(stage_dir(cfg, index))
    c.checkpoint.load = None
    if c.logging.tensorboard_dir:
        c.logging.tensorboard_dir = str(Path(c.logging.tensorboard_dir) / f"stage_{index}")
    return c


# Trainer fields a stage sets, and the stage field that sets them (stage_config).
_STAGE_FIELDS = {
    "training.lr": "lr",
    "training.min_lr": "min_lr",
    "training.lr_warmup_iters": "lr_warmup_iters",
    "training.lr_schedule": "lr_schedule",
    "training.train_iters": "train_iters",
    "mtp.num_heads": "heads",
}


def validate_stages(cfg: Config, world_size: int, vocab_size: Optional[int] = None, environment: bool = False) -> None:
    """Validate every stage's trainer config before the first one starts (ConfigError, one line).

    A later stage with a bad value would otherwise be found only after the earlier stages trained and wrote
    checkpoints. Errors about a value the stage set name the stage's field (looped.stages[2].lr), not the
    trainer field it became (training.lr).
    """
    from mtpd_megatron.config.validate import validate

    for index, st in enumerate(stages_of(cfg)):
        try:
            validate(stage_config(cfg, index), world_size, vocab_size, environment=environment)
        except ConfigError as e:
            message = str(e)
            for trainer_field, stage_field in _STAGE_FIELDS.items():
                if stage_field in ("train_iters", "heads") or getattr(st, stage_field) is not None:
                    message = re.sub(
                        re.escape(trainer_field) + r"(?![\w])", f"looped.stages[{index}].{stage_field}", message
                    )
            raise ConfigError(message) from None


def trained_heads(cfg: Config, index: int) -> tuple:
    """Which heads get a loss in this stage: all at stage 0; later the new ones (and the old if asked)."""
    stages = stages_of(cfg)
    st = stages[index]
    if index == 0:
        return (True,) * st.heads
    m = stages[index - 1].heads
    return tuple(k >= m or st.train_old_heads for k in range(st.heads))


def final_checkpoint(cfg: Config, index: int) -> Optional[Path]:
    """The stage's checkpoint at its last iteration, if it exists and is valid."""
    path = stage_dir(cfg, index) / layout.iter_dir_name(stages_of(cfg)[index].train_iters)
    return path if path.is_dir() and layout.verify(path) is None else None


def is_complete(cfg: Config, index: int) -> bool:
    return final_checkpoint(cfg, index) is not None


def has_progress(cfg: Config, index: int) -> bool:
    """A (partial) checkpoint of this stage exists: resume it rather than extending again."""
    return bool(layout.complete_checkpoints(stage_dir(cfg, index)))
