#!/usr/bin/env python3
"""Teacher-forced acceptance of MTP heads (a_k, CAR_k, tau) for one or more checkpoints -> JSON (+ PNG).

    python tools/eval_acceptance.py --ckpt runs/mtp/ckpt --ckpt runs/mtpd/ckpt --split valid \
        --num-samples 256 --out results.json --plot acceptance.png
    torchrun --nproc-per-node 4 tools/eval_acceptance.py --ckpt DIR --tp 2 ...   # TP 2 x DP 2

Every checkpoint is rebuilt from its own config at --tp/--ep (default 1: torch_dist reshards) and scored on
the same samples: the held-out split of the first checkpoint's training data, or windows of a jsonl file.
Samples are spread over the data-parallel ranks and the counts summed. Definitions:
mtpd_megatron/inference/acceptance.py. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    src.add_argument("--jsonl", help="evaluate on this jsonl file ({\"text\": ...} per line) instead")
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

    from mtpd_megatron.inference.acceptance import evaluate_acceptance, num_heads
    from mtpd_megatron.inference.loading import (
        jsonl_samples, load_for_inference, load_tokenizer_for, split_samples,
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
            raise ValueError(f"checkpoint {loaded.path} has vocabulary {loaded.vocab_size}, the first checkpoint "
                             f"{tokenizer.vocab_size}: checkpoints compared must share the tokenizer")
        dp = parallel_state.get_data_parallel_world_size()
        rank = parallel_state.get_data_parallel_rank()
        mine = samples[rank::dp]
        batches = [
            {"tokens": torch.stack([s["tokens"] for s in mine[j : j + args.batch_size]]),
             "loss_mask": torch.stack([s["loss_mask"] for s in mine[j : j + args.batch_size]])}
            for j in range(0, len(mine), args.batch_size)
        ]
        if not batches:
            raise ValueError(f"{len(samples)} samples for {dp} data-parallel ranks: pass --num-samples >= {dp}")
        t0 = time.perf_counter()
        metrics = evaluate_acceptance(loaded.model, batches, vocab_limit=loaded.vocab_size, max_k=args.max_k)
        label = args.label[i] if args.label else loaded.label
        results.append({
            "label": label, "path": str(loaded.path), "iteration": loaded.meta.get("iteration"),
            "num_heads": num_heads(loaded.model), "mtpd": bool(loaded.cfg.mtp.mtpd.enabled),
            **metrics, "seconds": time.perf_counter() - t0,
        })
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "definitions": "a_k = P(head k accepted | heads < k accepted), CAR_k = prod a_j, tau = 1 + sum CAR_k; "
                       "teacher-forced, head k at t vs main greedy at t+k",
        "data": source, "tp": args.tp, "ep": args.ep,
        "dp": parallel_state.get_data_parallel_world_size(), "checkpoints": results,
    }


def plot(result: dict, path: str) -> None:
    """Per-head a_k (left) and cumulative CAR_k (right), one series per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result["checkpoints"]:
        ks = list(range(1, len(r["a"]) + 1))
        name = f"{r['label']}  (tau={r['tau']:.2f})"
        left.plot(ks, [100 * x for x in r["a"]], marker="o", label=name)
        right.plot(ks, [100 * x for x in r["car"]], marker="o", label=name)
    for ax, title in ((left, "per-head acceptance a_k"), (right, "cumulative acceptance CAR_k")):
        ax.set_xlabel("head k (predicts token t+k+1)")
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=8)
    data = result["data"]
    fig.suptitle(f"teacher-forced MTP acceptance on {data.get('split') or Path(data.get('jsonl', '')).name} "
                 f"({data['sequences']} x {data['seq_length']} tokens)")
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _atomic(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _main(argv=None) -> int:
    args = parse_args(argv)
    result = evaluate(args)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        text = json.dumps(result, indent=1)

        def write_json(tmp):
            with open(tmp, "w") as f:
                f.write(text + "\n")

        _atomic(args.out, write_json)
        if args.plot:
            plot(result, args.plot)
        for r in result["checkpoints"]:
            a = " ".join(f"{x:.3f}" for x in r["a"])
            print(f"{r['label']}: tau={r['tau']:.3f} a_k=[{a}] ({r['positions']} positions)")
    return 0


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())
