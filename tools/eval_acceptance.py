#!/usr/bin/env python3
"""Main-head validation loss and teacher-forced MTP acceptance (a_k, CAR_k, tau) of checkpoints -> JSON (+ PNG).

    python tools/eval_acceptance.py --ckpt runs/mtp/ckpt --ckpt runs/mtpd/ckpt --split valid \
        --num-samples 256 --out results.json --plot acceptance.png
    torchrun --nproc-per-node 4 tools/eval_acceptance.py --ckpt DIR --tp 2 ...   # TP 2 x DP 2

Every checkpoint is rebuilt from its own config at --tp/--ep (default 1: torch_dist reshards) and scored on
the same samples: the held-out split of the first checkpoint's training data, or windows of a jsonl file.
Samples are spread over the data-parallel ranks and the counts summed. Each checkpoint's main-head loss and
perplexity come from the same forward as its acceptance (a checkpoint without MTP heads gets the loss only),
and a one-line warning says when compared checkpoints differ in main-head loss by more than 1%: a weaker
main head is easier to predict. Definitions: mtpd_megatron/inference/acceptance.py. User errors print one
line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "eval_acceptance"


def parse_args(argv=None) -> argparse.Namespace:
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint iter_N dir or save dir (repeatable)")
    p.add_argument("--label", action="append", default=None, help="legend label per --ckpt (default: MTP / MTP-D)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("valid", "test"), default="valid", help="held-out split of the training data")
    src.add_argument("--jsonl", help='evaluate on this jsonl file ({"text": ...} per line) instead')
    p.add_argument("--num-samples", type=int, default=64, help="sequences to evaluate (over all DP ranks)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: data.seq_length)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--data-path", action="append", default=None, help="override data.paths of the checkpoint")
    p.add_argument("--max-k", type=int, default=None, help="evaluate heads 1..max_k only")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run at")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size to run at")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--plot", default=None, help="PNG with per-head and cumulative acceptance curves")
    args = p.parse_args(argv)
    from mtpd_megatron.cli import check_device

    check_device(p, args.device)
    if args.label is not None and len(args.label) != len(args.ckpt):
        p.error(f"{len(args.label)} --label for {len(args.ckpt)} --ckpt: give one label per checkpoint or none")
    if args.num_samples < 1 or args.batch_size < 1:
        p.error("--num-samples and --batch-size must be >= 1")
    return args


def _dtype(name: str):
    import torch

    return {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def evaluate(args) -> dict:
    import torch
    from megatron.core import parallel_state

    from mtpd_megatron.inference.evaluation import DEFINITIONS, evaluate_loaded
    from mtpd_megatron.inference.loading import (
        jsonl_samples,
        load_for_inference,
        load_tokenizer_for,
        split_samples,
    )

    results, samples, tokenizer, source = [], None, None, None
    for i, spec in enumerate(args.ckpt):
        loaded = load_for_inference(spec, tp=args.tp, ep=args.ep, device=args.device, dtype=_dtype(args.dtype))
        if samples is None:  # the first checkpoint fixes the tokenizer and the samples every model is scored on
            tokenizer = load_tokenizer_for(loaded, args.tokenizer)
            seq = args.seq_length or loaded.cfg.data.seq_length
            if args.jsonl:
                samples = jsonl_samples(args.jsonl, tokenizer, seq, args.num_samples)
                source = {"jsonl": os.path.abspath(args.jsonl)}
            else:
                samples = split_samples(loaded, tokenizer, args.split, args.num_samples, seq, args.data_path)
                source = {"split": args.split, "data_paths": loaded.cfg.data.paths, "data_split": loaded.cfg.data.split}
            source.update(sequences=len(samples), seq_length=seq, tokenizer=str(getattr(tokenizer, "path", "")))
        elif loaded.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"checkpoint {loaded.path} has vocabulary {loaded.vocab_size}, the first checkpoint "
                f"{tokenizer.vocab_size}: checkpoints compared must share the tokenizer"
            )
        label = args.label[i] if args.label else None
        results.append(evaluate_loaded(loaded, samples, batch_size=args.batch_size, max_k=args.max_k, label=label))
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "definitions": DEFINITIONS,
        "data": source,
        "tp": args.tp,
        "ep": args.ep,
        "dp": parallel_state.get_data_parallel_world_size(),
        "checkpoints": results,
    }


def _main(argv=None) -> int:
    args = parse_args(argv)
    result = evaluate(args)
    import torch.distributed as dist

    from mtpd_megatron.checkpoint.atomic import write_atomic
    from mtpd_megatron.inference.evaluation import loss_gap_warning, plot_acceptance, summary_lines

    if not dist.is_initialized() or dist.get_rank() == 0:
        warning = loss_gap_warning(result["checkpoints"])
        result["warning"] = warning
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
        if args.plot:
            plot_acceptance(result, args.plot)
        for line in summary_lines(result["checkpoints"]):
            print(line)
        if warning:
            print(warning)
    return 0


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())
