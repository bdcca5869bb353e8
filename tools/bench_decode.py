#!/usr/bin/env python3
"""Batch-1 decoding benchmark: greedy vs self-speculative (K drafts from the MTP heads) on one model -> JSON.

    python tools/bench_decode.py --ckpt runs/mtpd/ckpt --split valid --k 1 2 4 --out bench.json
    python tools/bench_decode.py --config configs/dense_2b.yaml --k 1 2 4 --out cost.json  # random weights
    python tools/bench_decode.py --tiny --device cpu --new-tokens 16 --out smoke.json    # CPU smoke test

Both modes run in the same decoder (mtpd_megatron/inference/decoder.py) with the same optimisations: static
KV cache, and on CUDA one CUDA graph per decoding step (--no-cuda-graphs to compare eager). For each K it
reports tokens/s, the measured tokens per step (accepted drafts + 1), per-position acceptance, the step
cost relative to a greedy step, the wall-clock speedup over greedy and whether the tokens equal greedy's.
`--hf DIR` also times stock transformers `generate` (greedy) on an HF export of the same model.
`--config` builds a model with random weights from a config: its heads accept next to nothing, so it measures
the cost side only (step time of greedy vs K drafts) at a size no checkpoint of ours has been trained at.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "bench_decode"


def parse_args(argv=None) -> argparse.Namespace:
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(PROG, __doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint iter_N dir or save dir")
    model.add_argument("--config", help="random weights from this config (cost side only: heads untrained)")
    model.add_argument("--tiny", action="store_true", help="random tiny model (smoke test; heads untrained)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("valid", "test"), default="valid", help="prompts from this held-out split")
    src.add_argument("--jsonl", help="prompts from this jsonl file ({\"text\": ...} per line)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --config: vocabulary of the random model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--data-path", action="append", default=None, help="override data.paths of the checkpoint")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (prompts are cut to this length)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="draft counts (default: 1 2 4, plus 8 and 16 when the model has that many heads)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prompt (the median is kept)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="capture each decoding step in a CUDA graph (CUDA, TP=1)")
    p.add_argument("--fp32-logits", action="store_true",
                   help="take the argmax over fp32 logits (bf16 model): fewer bf16 rounding ties between verify and greedy")
    p.add_argument("--hf", default=None, help="also time transformers generate on this HF export")
    p.add_argument("--hf-repeats", type=int, default=1, help="timed runs per prompt of transformers generate")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args(argv)
    from mtpd_megatron.cli import check_device

    check_device(p, args.device)
    if args.k is not None and min(args.k) < 1:
        p.error(f"--k {' '.join(map(str, args.k))}: every K must be >= 1 (greedy is always measured)")
    if min(args.num_prompts, args.prompt_len, args.new_tokens, args.repeats, args.hf_repeats) < 1:
        p.error("--num-prompts, --prompt-len, --new-tokens, --repeats and --hf-repeats must be >= 1")
    return args


def default_ks(heads: int) -> list:
    return [k for k in (1, 2, 4, 8, 16) if k <= heads]


def bench_hf(path: str, prompts: list, new_tokens: int, reference: list, repeats: int, device: str) -> dict:
    """Stock transformers greedy `generate` (dynamic cache, eager), batch 1, same prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(p):
        ids = torch.tensor([p], device=device)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0, out[0, len(p):].tolist()

    run(prompts[0])
    seconds, tokens = [], []
    for p in prompts:
        runs = [run(p) for _ in range(repeats)]
        times = [t for t, _ in runs]
        i = times.index(statistics.median_low(times))
        seconds.append(runs[i][0])
        tokens.append(runs[i][1])
    n = sum(len(t) for t in tokens)
    return {"seconds": sum(seconds), "new_tokens": n, "tokens_per_second": n / sum(seconds),
            "matching_prompts": sum(a == b for a, b in zip(tokens, reference))}


TINY = {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                  "vocab_size": 256, "attention_backend": "sdpa"}, "mtp": {"num_heads": 4}}


def random_model(cfg, device: str, dtype):
    """The config's model with megatron's random init on a world of one, at TP = 1 without SP."""
    import torch

    from mtpd_megatron.inference.loading import ensure_distributed
    from mtpd_megatron.model.builder import build_model

    cfg.training.device = device
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.expert_model_parallel_size = 1
    cfg.parallel.pipeline_model_parallel_size = cfg.parallel.context_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    dev = ensure_distributed(cfg)
    model = build_model(cfg, vocab_size=cfg.model.vocab_size).to(dev).eval()
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return model.to(dtype), dev


def prompts_for(args, loaded) -> list:
    from mtpd_megatron.inference.loading import jsonl_texts, load_tokenizer_for, split_samples

    tokenizer = load_tokenizer_for(loaded, args.tokenizer)
    if args.jsonl:
        prompts = [list(tokenizer.tokenize(t))[: args.prompt_len] for t in jsonl_texts(args.jsonl)]
        prompts = [p for p in prompts if p][: args.num_prompts]
    else:
        samples = split_samples(loaded, tokenizer, args.split, args.num_prompts, args.prompt_len, args.data_path)
        prompts = [s["tokens"].tolist() for s in samples]
    if not prompts:
        raise ValueError("no prompts")
    return prompts


def _main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from mtpd_megatron.checkpoint.atomic import write_atomic
    from mtpd_megatron.inference.acceptance import num_heads

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.tiny or args.config:
        from mtpd_megatron.config import config_from_dict, load_config

        cfg = load_config(args.config) if args.config else config_from_dict(TINY)
        cfg.model.vocab_size = args.vocab_size or cfg.model.vocab_size
        if not cfg.model.vocab_size:
            raise ValueError(f"{args.config} has no model.vocab_size (it reads it from a tokenizer): give --vocab-size")
        model, dev = random_model(cfg, args.device, dtype)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, cfg.model.vocab_size, (args.num_prompts, args.prompt_len), generator=g).tolist()
        vocab_limit, source = None, {"random_weights": args.config or "tiny"}
    else:
        from mtpd_megatron.inference.loading import load_for_inference

        loaded = load_for_inference(args.ckpt, device=args.device, dtype=dtype)
        model, dev, vocab_limit = loaded.model, loaded.device, loaded.vocab_size
        prompts = prompts_for(args, loaded)
        source = {"ckpt": str(loaded.path), "jsonl": args.jsonl} if args.jsonl else \
            {"ckpt": str(loaded.path), "split": args.split}
    heads = num_heads(model)
    ks = args.k if args.k is not None else default_ks(heads)
    if any(k > heads or k < 1 for k in ks):
        raise ValueError(f"--k {ks}: every K must be in 1..{heads} (the model has {heads} MTP heads)")
    from mtpd_megatron.inference.benchmark import bench

    result, greedy_tokens = bench(model, prompts, ks, args.new_tokens, repeats=args.repeats,
                                  cuda_graphs=args.cuda_graphs, vocab_limit=vocab_limit, fp32_logits=args.fp32_logits)
    if args.hf:
        result["hf_generate"] = bench_hf(args.hf, prompts, args.new_tokens, greedy_tokens, args.hf_repeats, str(dev))
    result.update({
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype), "fp32_logits": args.fp32_logits, "cuda_graphs": bool(args.cuda_graphs and dev.type == "cuda"),
        "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": args.new_tokens,
        "repeats": args.repeats, "num_heads": heads, "source": source,
    })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    g = result["greedy"]
    phases = lambda r: "".join(f", {n[:-3]} {r[n]:.2f} ms" for n in ("verify_ms", "draft_ms") if n in r)
    print(f"greedy: {g['tokens_per_second']:.1f} tok/s ({g['step_ms']:.2f} ms/step{phases(g)})")
    for r in result["speculative"]:
        print(f"k={r['k']}: {r['tokens_per_second']:.1f} tok/s, {r['tokens_per_step']:.2f} tok/step, "
              f"step cost {r['step_cost_vs_greedy']:.2f}x, speedup {r['speedup']:.2f}x, "
              f"identical to greedy on {r['matching_prompts']}/{len(prompts)} prompts{phases(r)}")
    return 0


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())
