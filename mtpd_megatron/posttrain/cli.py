"""tools/finetune_hf.py: flags and dotted overrides onto the typed post-training config, then finetune()."""

from __future__ import annotations

from typing import Optional, Sequence

PROG = "finetune_hf.py"
FLAGS = {
    "model": "model.path",
    "out": "out",
    "heads": "heads",
    "zero_stage": "deepspeed.zero_stage",
    "train_iters": "training.train_iters",
    "device": "training.device",
    "dtype": "model.dtype",
}


def parser():
    from mtpd_megatron.cli import cli_parser
    from mtpd_megatron.posttrain.config import DEVICES, DTYPES, HEAD_MODES, ZERO_STAGES

    p = cli_parser(
        PROG,
        "Fine-tune a Hugging Face export with its MTP heads under DeepSpeed ZeRO (main model: CE; "
        "heads: MTP-D, CE only or frozen) and write an export with the heads. Run under torchrun for "
        "several ranks; alone it is a world of one.",
    )
    p.add_argument("--config", default=None, help="post-training YAML (e.g. configs/posttrain/stdlib_gpu_small.yaml)")
    p.add_argument("--model", default=None, help="the export to fine-tune (model.path)")
    p.add_argument("--out", default=None, help="directory of the fine-tuned export (out)")
    p.add_argument("--heads", default=None, choices=HEAD_MODES, help="what the heads learn (heads)")
    p.add_argument("--zero-stage", type=int, default=None, choices=ZERO_STAGES, help="DeepSpeed ZeRO stage")
    p.add_argument("--train-iters", type=int, default=None, help="optimizer steps (training.train_iters)")
    p.add_argument("--device", default=None, choices=DEVICES, help="training.device")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="model.dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out scoring and the reload-and-draft check")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. mtp.mtpd.beta=[1,1] training.lr=5e-5",
    )
    return p


def overrides_of(args) -> list:
    """Dotted overrides with the flags last (flags win over the YAML and over positional overrides)."""
    out = list(args.overrides)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.overwrite:
        out.append("overwrite=true")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.posttrain.config import load_posttrain_config, validate_posttrain
    from mtpd_megatron.posttrain.finetune import finetune

    args = parser().parse_args(argv)
    cfg = load_posttrain_config(args.config, overrides_of(args))
    validate_posttrain(cfg)  # before DeepSpeed is imported or a process group exists
    finetune(cfg, evaluate=not args.no_eval)
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, main, argv, cleanup=shutdown_distributed)
