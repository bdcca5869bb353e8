"""Config checker: `python -m mtpd_megatron.config CFG [section.key=value ...] [--world-size N]`;
field reference: `python -m mtpd_megatron.config --help-config [section]` (e.g. `mtp.mtpd`).

Loads, overrides and validates a config the way the trainer will, without torch, process groups or
files, and prints the resolved config (valid YAML) followed by the layout and parameter counts as
comments. A bad config prints one `error:` line and exits with code 2, so a Slurm script can check a
config on the login node before it queues anything (`--no-env` skips the checks of this machine, such as
Transformer Engine being installed, when the config is meant for other nodes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from typing import Optional, Sequence

from mtpd_megatron.cli import cli_parser, report_error
from mtpd_megatron.config.load import ConfigError, dump_config, load_config
from mtpd_megatron.config.params import count_parameters, format_count
from mtpd_megatron.config.schema import Config
from mtpd_megatron.config.validate import validate

PROG = "python -m mtpd_megatron.config"


def _parser() -> argparse.ArgumentParser:
    parser = cli_parser(
        PROG,
        "Load, override and validate a config as the trainer will; print "
        "it with its parallel layout and parameter counts. Exit code 2 on a bad config.",
    )
    parser.add_argument("config", nargs="?", help="YAML config file, e.g. configs/tiny_dense.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as model.num_layers=4")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to check the layout for (default: the smallest the layout allows)",
    )
    parser.add_argument(
        "--no-env",
        action="store_true",
        help="skip the checks of this machine (Transformer Engine installed, output paths usable): "
        "for a config meant for other nodes",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary size (default: model.vocab_size, else read data.tokenizer)",
    )
    parser.add_argument(
        "--help-config",
        nargs="?",
        const="",
        default=None,
        metavar="SECTION",
        help="print every config field (or a section's, e.g. mtp.mtpd) with its type, default and doc",
    )
    return parser


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        name = " | ".join(_type_name(a) for a in args)
        return name + (" | null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def config_reference(section: str = "") -> str:
    """The schema's own docs (schema.py keeps one per field): `section.key (type, default): doc` lines."""
    cls, prefix = Config, ""
    for part in [p for p in section.split(".") if p]:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            sections = [
                f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
            ]
            raise ConfigError(f"--help-config {section}: no section {part!r} (sections here: {', '.join(sections)})")
        cls, prefix = hints[part], f"{prefix}{part}."
    lines = []

    def walk(klass, pre: str) -> None:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{pre}{f.name}: {f.metadata.get('doc', '')}")
                walk(tp, f"{pre}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {pre}{f.name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('doc', '')}")

    walk(cls, prefix)
    return "\n".join(lines)


def smallest_world_size(cfg: Config) -> int:
    """The fewest ranks that fit both the dense grid (TP*PP*CP) and the expert grid (ETP*EP*PP)."""
    p = cfg.parallel
    dense = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if not cfg.model.moe.num_experts:
        return max(dense, 1)
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    return max(math.lcm(dense, etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size), 1)


def tokenizer_vocab_size(cfg: Config) -> Optional[int]:
    """Vocabulary size of data.tokenizer if that file exists (it may not yet: the demo writes it)."""
    path = cfg.data.tokenizer
    if not path or not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise ConfigError(
            f"data.tokenizer={path!r}: not a Hugging Face tokenizer.json ({' '.join(str(err).split())[:120]})"
        ) from None


def summary(cfg: Config, world: int, vocab_size: Optional[int]) -> str:
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    lines = [
        f"# layout: world {world} = TP {tp} x PP {pp} x CP {cp} x DP {world // (tp * pp * cp)}"
        f"{' (sequence parallel)' if p.sequence_parallel else ''}"
    ]
    if cfg.model.moe.num_experts:
        etp = p.expert_tensor_parallel_size or tp
        lines.append(
            f"# experts: EP {p.expert_model_parallel_size} x ETP {etp} x expert-DP "
            f"{world // (p.expert_model_parallel_size * etp * pp)}"
        )
    vocab = cfg.model.vocab_size or vocab_size
    if vocab is None:
        lines.append(
            f"# parameters: unknown until the tokenizer exists ({cfg.data.tokenizer}); "
            "pass --vocab-size N to count them"
        )
        return "\n".join(lines)
    c = count_parameters(cfg, vocab)
    lines += [
        f"# vocabulary: {vocab} padded to {c['padded_vocab_size']}",
        f"# parameters: main model {format_count(c['main_model'])} ({format_count(c['main_model_active'])} "
        f"active per token), {cfg.mtp.num_heads} MTP heads {format_count(c['mtp_heads'])} "
        f"({format_count(c['mtp_head'])} each), total {format_count(c['total'])} "
        f"({format_count(c['active'])} active)",
        f"# of which: embedding {format_count(c['embedding'])}, output layer {format_count(c['output_layer'])}"
        f"{' (tied)' if cfg.model.tie_embeddings else ''}, decoder {format_count(c['decoder'])}",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.help_config is not None:
        try:
            print(config_reference(args.help_config))
        except ConfigError as err:
            return report_error(PROG, err)
        return 0
    if args.config is None:
        parser.error("give a config file (or --help-config)")
    try:
        cfg = load_config(args.config, args.overrides, flag=None)
        world = args.world_size if args.world_size is not None else smallest_world_size(cfg)
        vocab_size = args.vocab_size if args.vocab_size is not None else tokenizer_vocab_size(cfg)
        validate(cfg, world, vocab_size, environment=not args.no_env)
    except ConfigError as err:
        return report_error(PROG, err)
    sys.stdout.write(dump_config(cfg))
    print(summary(cfg, world, vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
