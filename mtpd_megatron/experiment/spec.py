"""An experiment file: one base config, overrides shared by every arm, and named arms.

    name: seesaw
    base: configs/gpu_small.yaml              # relative to the repository root or to this file
    overrides: {training.train_iters: 600}    # dotted config keys, applied to every arm
    reference: a_no_mtp                       # the arm every main-head loss is compared with
    evaluation: {num_samples: 64, decode: {k: [1, 2, 3, 4]}}
    arms:
      a_no_mtp: {overrides: {mtp.num_heads: 0, mtp.mtpd.enabled: false}}
      c_mtpd:   {overrides: {mtp.loss_scaling_factor: 0.3}, note: "the paper's MTP-D"}
      h_looped: {extend: {parent: c_mtpd, heads: 8, train_iters: 300}}   # looped extension of c_mtpd

Everything is checked before anything is written (`load_experiment` raises ConfigError, one line naming the
field): unknown keys at any level, every arm's full trainer config (megatron's own constraints included),
equal token budgets and seeds across the trained-from-scratch arms (an experiment compares at equal tokens;
extension arms add their own, stated budget on top of their parent's), parents that exist.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mtpd_megatron.config.load import ConfigError, _build, _set_dotted, config_to_dict, read_yaml
from mtpd_megatron.config.schema import Config, LoopedConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DecodeSpec:
    """Real decoding of held-out prompts (tokens/step, wall-clock) for arms with MTP heads."""

    when: str = "cuda"  # cuda: only on a GPU (wall-clock means nothing on CPU); always; never
    k: list = field(default_factory=lambda: [1, 2, 3, 4])
    num_prompts: int = 8
    prompt_len: int = 128
    new_tokens: int = 256
    repeats: int = 1


@dataclass
class EvaluationSpec:
    split: str = "valid"
    num_samples: int = 64  # held-out sequences of data.seq_length for main-head loss and acceptance
    batch_size: int = 8
    gradient_batches: int = 2  # batches of the trunk-gradient diagnostic (0 = off)
    decode: DecodeSpec = field(default_factory=DecodeSpec)


@dataclass
class ExtendSpec:
    """A looped-extension arm: `parent`'s final checkpoint grown to `heads` heads, main model and the
    parent's heads frozen (looped/ stage rules)."""

    parent: str = ""
    heads: int = 8
    train_iters: int = 100
    init: str = "copy"
    train_old_heads: bool = False
    lr: Optional[float] = None
    lr_warmup_iters: Optional[int] = None


@dataclass
class ArmSpec:
    overrides: dict = field(default_factory=dict)
    extend: Optional[ExtendSpec] = None
    note: str = ""
    decode: bool = True


@dataclass
class ExperimentFile:
    name: str = ""
    base: str = ""
    overrides: dict = field(default_factory=dict)
    reference: Optional[str] = None
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    arms: dict = field(default_factory=dict)


@dataclass
class Arm:
    """One arm, resolved: its trainer config (paths inside the experiment directory) and what to run."""

    name: str
    spec: ArmSpec
    config: Config
    directory: Path

    @property
    def is_extension(self) -> bool:
        return self.spec.extend is not None

    @property
    def tokens(self) -> int:
        t = self.config.training
        return t.train_iters * t.global_batch_size * self.config.data.seq_length

    @property
    def config_hash(self) -> str:
        """What the arm trains (paths excluded): a finished arm with another hash is a different arm."""
        data = config_to_dict(self.config)
        data.pop("name")
        data["checkpoint"] = data["logging"] = data["looped"]["root"] = None
        for section, knob in EXECUTION_KNOBS:  # how a step is computed (same numbers), not what is trained
            _section(data, section).pop(knob, None)
        if not data["model"].get("init_on_device"):  # added after arms were recorded: hashed only when set
            data["model"].pop("init_on_device", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Switches that change how a step is computed, exactly or to rounding, not what is trained: an arm run with a
# kernel switch on is the same arm (and arms recorded before a switch existed keep their hash).
EXECUTION_KNOBS = (
    ("mtp.mtpd", "compile"),
    ("mtp.mtpd", "chunk_elems"),
    ("mtp.mtpd", "fused_output_layer"),
    ("mtp.mtpd", "share_teacher_logits"),
    ("model", "compile_layers"),
    ("model.moe", "experts_backend"),
    ("training", "fused_adam"),
    ("training", "foreach_multi_tensor"),
)


def _section(data: dict, dotted: str) -> dict:
    for key in dotted.split("."):
        data = data.get(key) or {}
    return data


@dataclass
class Experiment:
    name: str
    path: Path
    out: Path
    file: ExperimentFile
    arms: dict  # name -> Arm, in file order

    @property
    def reference(self) -> Optional[str]:
        return self.file.reference


def _base_path(base: str, exp_path: Path) -> Path:
    for candidate in (Path(base), ROOT / base, exp_path.parent / base):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"base: {base!r} not found (give a config path relative to the repository root, e.g. configs/gpu_small.yaml)"
    )


def _apply(data: dict, overrides: dict, where: str) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys, e.g. {{mtp.num_heads: 0}}")
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key.startswith("."):
            raise ConfigError(f"{where}.{key}: keys are dotted config fields such as training.lr")
        _set_dotted(data, key, value)


def _arm_config(base: dict, common: dict, arm: ArmSpec, name: str, exp_name: str, directory: Path) -> Config:
    data = copy.deepcopy(base)
    _apply(data, common, "overrides")
    _apply(data, arm.overrides, f"arms.{name}.overrides")
    try:
        cfg = _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"arms.{name}: {e}") from None
    cfg.name = f"{exp_name}-{name}"
    cfg.looped = LoopedConfig()  # a base preset's looped extension is not this arm's (extension arms set theirs)
    cfg.checkpoint.save = str(directory / "ckpt")
    cfg.checkpoint.load = None
    cfg.checkpoint.resume = "auto"
    cfg.checkpoint.keep_last = 1
    cfg.checkpoint.save_interval = 0
    cfg.logging.tensorboard_dir = str(directory / "logs")
    cfg.logging.progress_bar = "off"
    return cfg


def _extension_config(parent: Arm, arm: ArmSpec, name: str, exp_name: str, directory: Path) -> Config:
    ext = arm.extend
    cfg = copy.deepcopy(parent.config)
    cfg.name = f"{exp_name}-{name}"
    cfg.looped.root = str(directory / "stages")
    cfg.checkpoint.keep_last = 0  # keep the iteration-0 checkpoint: the training-free copy is evaluated too
    stage = {
        "heads": ext.heads,
        "init": ext.init,
        "train_iters": ext.train_iters,
        "train_old_heads": ext.train_old_heads,
    }
    for key in ("lr", "lr_warmup_iters"):
        if getattr(ext, key) is not None:
            stage[key] = getattr(ext, key)
    cfg.looped.stages = [
        {"heads": parent.config.mtp.num_heads, "train_iters": parent.config.training.train_iters},
        stage,
    ]
    cfg.logging.tensorboard_dir = str(directory / "logs")
    return cfg


def load_experiment(path: str, out: Optional[str] = None) -> Experiment:
    """Read and check an experiment file; resolve every arm's config. Writes nothing."""
    from mtpd_megatron.config.validate import validate
    from mtpd_megatron.looped import stages as looped_stages

    exp_path = Path(path)
    raw = read_yaml(path)
    spec = _build(ExperimentFile, raw)
    if not spec.name:
        raise ConfigError("name: not set (the experiment's name, used for its output directory)")
    if not spec.base:
        raise ConfigError("base: not set (the config every arm starts from, e.g. configs/gpu_small.yaml)")
    if not spec.arms or not isinstance(spec.arms, dict):
        raise ConfigError("arms: give at least one named arm, e.g. arms: {mtp: {overrides: {mtp.mtpd.enabled: false}}}")
    ev = spec.evaluation
    if ev.decode.when not in ("cuda", "always", "never"):
        raise ConfigError(f"evaluation.decode.when={ev.decode.when!r}: must be one of cuda, always, never")
    for key in ("num_samples", "batch_size"):
        if getattr(ev, key) < 1:
            raise ConfigError(f"evaluation.{key}: must be >= 1")
    if not ev.decode.k or any(not isinstance(k, int) or k < 1 for k in ev.decode.k):
        raise ConfigError(f"evaluation.decode.k={ev.decode.k!r}: give draft counts >= 1, e.g. [1, 2, 3, 4]")
    out_dir = Path(out) if out else ROOT / "runs" / "experiments" / spec.name
    base = read_yaml(str(_base_path(spec.base, exp_path)))

    arm_specs = {}
    for name, item in spec.arms.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"arms.{name}: arm names use letters, digits, '_', '-' and '.' (they name directories)")
        if item is None:
            item = {}
        if not isinstance(item, dict):
            raise ConfigError(f"arms.{name}: expected a mapping with overrides/extend/note/decode")
        arm_specs[name] = _build(ArmSpec, item, f"arms.{name}")
        if item.get("extend") is not None and not isinstance(item["extend"], dict):
            raise ConfigError(f"arms.{name}.extend: expected a mapping such as {{parent: c, heads: 8}}")

    arms: dict = {}
    for name, arm_spec in arm_specs.items():  # trained from scratch first: extensions need their parents
        if arm_spec.extend is None:
            cfg = _arm_config(base, spec.overrides, arm_spec, name, spec.name, out_dir / name)
            try:
                validate(cfg, 1)
            except ConfigError as e:
                raise ConfigError(f"arms.{name}: {e}") from None
            arms[name] = Arm(name, arm_spec, cfg, out_dir / name)
    for name, arm_spec in arm_specs.items():
        ext = arm_spec.extend
        if ext is None:
            continue
        if arm_spec.overrides:
            raise ConfigError(
                f"arms.{name}.overrides: an extension arm trains with its parent's config (set "
                "the stage's heads/train_iters/init/lr under extend)"
            )
        parent = arms.get(ext.parent)
        if parent is None:
            raise ConfigError(
                f"arms.{name}.extend.parent: {ext.parent!r} is not an arm trained from scratch "
                f"(choose from {', '.join(arms) or 'none'})"
            )
        if parent.config.mtp.num_heads < 1:
            raise ConfigError(f"arms.{name}.extend.parent: {ext.parent} has no MTP heads to extend")
        cfg = _extension_config(parent, arm_spec, name, spec.name, out_dir / name)
        try:
            looped_stages.stages_of(cfg)
        except ConfigError as e:
            raise ConfigError(f"arms.{name}.extend: {str(e).replace('looped.stages[1].', '')}") from None
        arms[name] = Arm(name, arm_spec, cfg, out_dir / name)
    arms = {name: arms[name] for name in arm_specs}  # file order

    scratch = [a for a in arms.values() if not a.is_extension]
    first = scratch[0]
    for arm in scratch[1:]:
        if arm.tokens != first.tokens:
            raise ConfigError(
                f"arms.{arm.name}: trains {arm.tokens} tokens (train_iters x global_batch_size x "
                f"seq_length) but arms.{first.name} trains {first.tokens}: arms compare at equal tokens"
            )
        if arm.config.training.seed != first.config.training.seed:
            raise ConfigError(
                f"arms.{arm.name}: training.seed={arm.config.training.seed} but arms.{first.name} "
                f"uses {first.config.training.seed}: arms compare at the same seed"
            )
        if arm.config.data.paths != first.config.data.paths or arm.config.data.split != first.config.data.split:
            raise ConfigError(
                f"arms.{arm.name}: data.paths/data.split differ from arms.{first.name}'s: arms compare on the same data"
            )
    if spec.reference is not None and spec.reference not in arms:
        raise ConfigError(f"reference: {spec.reference!r} is not an arm (choose from {', '.join(arms)})")
    if spec.reference is None:
        spec.reference = next((a.name for a in scratch if a.config.mtp.num_heads == 0), None)
    return Experiment(spec.name, exp_path, out_dir, spec, arms)


def parse_arm_list(text: Optional[str], experiment: Experiment) -> list:
    """--arms a,b -> arm names (checked); None -> every arm. Extension arms pull in their parent."""
    if not text:
        return list(experiment.arms)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in experiment.arms]
    if unknown:
        raise ConfigError(
            f"--arms {text}: {unknown[0]!r} is not an arm of {experiment.path} (choose from "
            f"{', '.join(experiment.arms)})"
        )
    chosen = set(names)
    for n in names:
        ext = experiment.arms[n].spec.extend
        if ext is not None:
            chosen.add(ext.parent)
    return [n for n in experiment.arms if n in chosen]


def relative(path: Path) -> str:
    """A path as the user reads it in tables: relative to the repository when inside it."""
    try:
        return os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else str(path)
    except ValueError:
        return str(path)
