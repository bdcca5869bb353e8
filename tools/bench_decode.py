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

Issue-12 measurements, all in the same run as the greedy baseline (K = --main-k, default min(4, heads)):
`--profile DIR` kernel tables + grouped summary of one greedy and one K-draft step (inference/profile.py);
`--ablate [SWITCH ...]` each DecodeOptions switch on vs off (inference/options.py ABLATION_SWITCHES);
`--draft-threshold P ...` adaptive drafting vs fixed K = 1..K (or `--adaptive-fixed K ...`);
`--draft-vocab N ...` K drafts from a frequency-ranked draft vocabulary of N ids (token counts of the
checkpoint's data.paths); `--exact-greedy` the greedy that runs the verify's kernels, with the prompt
mismatches of K drafts against both greedy decoders; `--batch B ...` greedy vs K drafts at each batch size.
The base options of every row come from --compile, --graph-scope, --sync-every, --host-sync-per-depth,
--fused-prologue, --argmax-chunk, --fp32-logits, --cuda-graphs (CUDA graphs are a documented no-op on CPU;
--compile on CPU is an error). Every figure is reported with the
model's main-head validation loss (`main_loss`: the experiment's result.json beside the checkpoint, else
computed on --loss-samples held-out sequences). `--markdown FILE` writes the tables.
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
    from mtpd_megatron.inference.options import COMPILE_MODES

    p = cli_parser(PROG, __doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint iter_N dir or save dir")
    model.add_argument("--config", help="random weights from this config (cost side only: heads untrained)")
    model.add_argument("--tiny", action="store_true", help="random tiny model (smoke test; heads untrained)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("valid", "test"), default="valid", help="prompts from this held-out split")
    src.add_argument("--jsonl", help='prompts from this jsonl file ({"text": ...} per line)')
    p.add_argument("--vocab-size", type=int, default=None, help="with --config: vocabulary of the random model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--data-path", action="append", default=None, help="override data.paths of the checkpoint")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (prompts are cut to this length)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="draft counts (default: 1 2 4, plus 8 and 16 when the model has that many heads)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prompt (the median is kept)")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture each decoding step in a CUDA graph (CUDA, TP=1)",
    )
    p.add_argument(
        "--fp32-logits",
        action="store_true",
        help="take the argmax over fp32 logits (bf16 model): fewer bf16 rounding ties between verify and greedy",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each piece of the step (verify, acceptance, each depth) inside the graph (CUDA)",
    )
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode with --compile (max-autotune-no-cudagraphs: Triton GEMM templates vs cuBLAS)",
    )
    p.add_argument(
        "--graph-scope",
        choices=("step", "phase"),
        default="step",
        help="one CUDA graph per step, or one for the verify and one per draft depth",
    )
    p.add_argument("--sync-every", type=int, default=64, help="decoding steps between host reads of the lengths")
    p.add_argument("--host-sync-per-depth", action="store_true", help="read the drafts on the host after every depth")
    p.add_argument("--fused-prologue", action="store_true", help="enorm+hnorm+concat+eh_proj as norm + one GEMM")
    p.add_argument("--argmax-chunk", type=int, default=0, help="greedy over vocabulary chunks of this many rows")
    p.add_argument("--max-skips", type=int, default=3, help="adaptive drafting: steps a head may be skipped")
    p.add_argument("--main-k", type=int, default=None, help="K of the profile/ablation/exact/adaptive/batch rows")
    p.add_argument("--profile", default=None, metavar="DIR", help="write kernel tables of a greedy and a K step here")
    p.add_argument(
        "--ablate",
        nargs="*",
        default=None,
        metavar="SWITCH",
        help="flip each switch (default: all of inference/options.py ABLATION_SWITCHES) vs the baseline",
    )
    p.add_argument(
        "--draft-threshold",
        type=float,
        nargs="+",
        default=None,
        metavar="P",
        help="adaptive drafting: stop at the first head whose top-1 probability is below P",
    )
    p.add_argument(
        "--adaptive-fixed",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="with --draft-threshold: the fixed-K rows it is compared with (default 1..main K; each K compiles "
        "its own verify width, so a device call may have room only for the best fixed K of an earlier run)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="K drafts proposing only among the N most frequent tokens of the training data (random weights: ids "
        "0..N-1), vs the whole vocabulary",
    )
    p.add_argument("--exact-greedy", action="store_true", help="also the greedy that runs the verify's kernels")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="greedy vs K drafts at these batch sizes")
    p.add_argument("--loss-samples", type=int, default=64, help="held-out sequences for the main-head loss")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
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
    if args.main_k is not None and args.main_k < 1:
        p.error(f"--main-k {args.main_k}: must be >= 1 (and <= the model's MTP heads)")
    if args.draft_threshold and any(not 0.0 < t < 1.0 for t in args.draft_threshold):
        p.error(f"--draft-threshold {' '.join(map(str, args.draft_threshold))}: each must be a probability in (0, 1)")
    if args.draft_vocab and min(args.draft_vocab) < 1:
        p.error(
            f"--draft-vocab {' '.join(map(str, args.draft_vocab))}: each N must be >= 1 (the whole vocabulary is always measured)"
        )
    if args.batch and min(args.batch) < 1:
        p.error(f"--batch {' '.join(map(str, args.batch))}: batch sizes must be >= 1")
    if args.sync_every < 1 or args.argmax_chunk < 0 or args.max_skips < 0 or args.loss_samples < 1:
        p.error("--sync-every and --loss-samples must be >= 1, --argmax-chunk and --max-skips >= 0")
    from mtpd_megatron.inference.options import ABLATION_SWITCHES

    unknown = [s for s in (args.ablate or []) if s not in ABLATION_SWITCHES]
    if unknown:
        p.error(f"--ablate {' '.join(unknown)}: unknown switch (choose from {', '.join(ABLATION_SWITCHES)})")
    if args.compile:
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            p.error("--compile needs a CUDA device (torch.compile is measured inside the CUDA graph): drop it on CPU")
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
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        sync()
        return time.perf_counter() - t0, out[0, len(p) :].tolist()

    run(prompts[0])
    seconds, tokens = [], []
    for p in prompts:
        runs = [run(p) for _ in range(repeats)]
        times = [t for t, _ in runs]
        i = times.index(statistics.median_low(times))
        seconds.append(runs[i][0])
        tokens.append(runs[i][1])
    n = sum(len(t) for t in tokens)
    return {
        "seconds": sum(seconds),
        "new_tokens": n,
        "tokens_per_second": n / sum(seconds),
        "matching_prompts": sum(a == b for a, b in zip(tokens, reference)),
    }


TINY = {
    "model": {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "vocab_size": 256,
        "attention_backend": "sdpa",
    },
    "mtp": {"num_heads": 4},
}


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
        raise ValueError(
            f"no prompts in {args.jsonl or args.split}: every prompt needs at least one token (texts "
            "are empty after tokenisation)"
        )
    return prompts


def main_loss_of(args, loaded) -> dict:
    """The checkpoint's main-head validation loss: the experiment's result.json beside it, else computed."""
    for parent in list(loaded.path.parents)[:3]:
        result = parent / "result.json"
        if result.is_file():
            data = json.loads(result.read_text())
            if isinstance(data, dict) and data.get("main_loss") is not None:
                return {"main_loss": data["main_loss"], "source": str(result), "arm": data.get("arm")}
    from mtpd_megatron.inference.evaluation import evaluate_loaded
    from mtpd_megatron.inference.loading import load_tokenizer_for, split_samples

    tokenizer = load_tokenizer_for(loaded, args.tokenizer)
    samples = split_samples(loaded, tokenizer, "valid", args.loss_samples, None, args.data_path)
    metrics = evaluate_loaded(loaded, samples)
    return {
        "main_loss": metrics["main_loss"],
        "source": f"computed on {len(samples)} valid sequences",
        "tau": metrics.get("tau"),
    }


def token_ranking_for(args, loaded, model) -> tuple:
    """Token ids most frequent first, and where the counts came from: every token of the checkpoint's
    data.paths (or --data-path) for a checkpoint; the id order for random weights (cost side only)."""
    import torch

    if loaded is None:
        return torch.arange(model.embedding.word_embeddings.weight.shape[0]), "id order (random weights)"
    from mtpd_megatron.data.datasets import parse_paths
    from mtpd_megatron.data.indexed import token_counts

    prefixes, _ = parse_paths(args.data_path or loaded.cfg.data.paths)
    counts = sum(torch.from_numpy(token_counts(prefix, loaded.vocab_size)) for prefix in prefixes)
    return counts.argsort(descending=True, stable=True), f"token counts of {', '.join(map(str, prefixes))}"


def _main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from mtpd_megatron.checkpoint.atomic import write_atomic
    from mtpd_megatron.inference.acceptance import num_heads
    from mtpd_megatron.inference.options import ABLATION_SWITCHES, DecodeOptions

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    main_loss = {"main_loss": None, "source": "random weights (cost side only)"}
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
        source = (
            {"ckpt": str(loaded.path), "jsonl": args.jsonl}
            if args.jsonl
            else {"ckpt": str(loaded.path), "split": args.split}
        )
    heads = num_heads(model)
    ks = args.k if args.k is not None else default_ks(heads)
    if any(k > heads or k < 1 for k in ks):
        raise ValueError(f"--k {ks}: every K must be in 1..{heads} (the model has {heads} MTP heads)")
    vocab = vocab_limit or model.embedding.word_embeddings.weight.shape[0]
    if args.draft_vocab and max(args.draft_vocab) >= vocab:
        raise ValueError(
            f"--draft-vocab {' '.join(map(str, args.draft_vocab))}: each N must be below the model's {vocab} token ids "
            "(the whole vocabulary is always measured)"
        )
    main_k = args.main_k if args.main_k is not None else min(4, heads)
    if main_k > heads:
        raise ValueError(f"--main-k {main_k}: the model has {heads} MTP heads")
    if args.adaptive_fixed and not all(1 <= j <= main_k for j in args.adaptive_fixed):
        raise ValueError(f"--adaptive-fixed {' '.join(map(str, args.adaptive_fixed))}: each K must be in 1..{main_k}")
    context = getattr(model, "max_sequence_length", None)
    longest = max(len(p) for p in prompts)
    if context is not None and longest + args.new_tokens > context:
        raise ValueError(
            f"--prompt-len {longest} + --new-tokens {args.new_tokens} exceed the model's context of "
            f"{context} tokens: shorten the prompts or ask for fewer new tokens"
        )
    cuda = dev.type == "cuda"
    base = DecodeOptions(
        cuda_graphs=bool(args.cuda_graphs and cuda),
        graph_scope=args.graph_scope,
        sync_every=args.sync_every,
        host_sync_per_depth=args.host_sync_per_depth,
        compile=args.compile,
        compile_mode=args.compile_mode,
        fused_prologue=args.fused_prologue,
        argmax_chunk=args.argmax_chunk,
        max_skips=args.max_skips,
        fp32_logits=args.fp32_logits,
    )
    if args.ckpt:
        main_loss = main_loss_of(args, loaded)
    from mtpd_megatron.inference import benchmark as B

    result = {}
    out = Path(args.out)
    meta = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "dtype": str(next(model.parameters()).dtype),
        "fp32_logits": args.fp32_logits,
        "cuda_graphs": base.cuda_graphs,
        "options": base.as_dict(),
        "main_k": main_k,
        "main_loss": main_loss["main_loss"],
        "main_loss_source": main_loss["source"],
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "num_heads": heads,
        "source": source,
    }

    def save(complete: bool) -> None:
        """Written after every section (complete=false until the end), so a time limit keeps what was measured."""
        result.update(meta, complete=complete)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=1) + "\n")
        if args.markdown and "greedy" in result:
            from mtpd_megatron.inference.bench_report import markdown_report

            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(args.markdown), markdown_report(result))

    if args.profile and main_k:
        from mtpd_megatron.inference.decoder import SpeculativeDecoder
        from mtpd_megatron.inference.profile import profile_step, summary_markdown

        length = longest + args.new_tokens
        summaries = [
            B._safely(
                profile_step,
                SpeculativeDecoder(model, k=k, max_length=length, vocab_limit=vocab_limit, options=base),
                prompts[0],
                args.new_tokens,
                args.profile,
                "greedy" if k == 0 else f"k{k}",
            )
            for k in (0, main_k)
        ]
        summaries = [
            dict(
                s,
                label=s.get("label", f"failed {i}"),
                by_category_ms=s.get("by_category_ms", {}),
                by_region_ms=s.get("by_region_ms", {}),
            )
            for i, s in enumerate(summaries)
        ]
        result["profile"] = summaries
        Path(args.profile, "summary.md").write_text(summary_markdown(summaries))
    bench_result, greedy_tokens = B.bench(
        model, prompts, ks, args.new_tokens, repeats=args.repeats, vocab_limit=vocab_limit, options=base
    )
    result.update(bench_result)
    save(False)
    if args.hf:
        result["hf_generate"] = bench_hf(args.hf, prompts, args.new_tokens, greedy_tokens, args.hf_repeats, str(dev))
        save(False)
    common = dict(repeats=args.repeats, vocab_limit=vocab_limit)
    if args.exact_greedy and main_k:
        result["exact"] = B.bench_exact(model, prompts, main_k, args.new_tokens, base, **common)
        save(False)
    if args.draft_threshold and main_k:
        result["adaptive"] = B.bench_adaptive(
            model, prompts, main_k, args.draft_threshold, args.new_tokens, base, fixed=args.adaptive_fixed, **common
        )
        save(False)
    if args.draft_vocab and main_k:
        ranking, result["draft_ranking_source"] = token_ranking_for(args, loaded if args.ckpt else None, model)
        result["draft_vocab"] = B.bench_draft_vocab(
            model, prompts, main_k, args.draft_vocab, args.new_tokens, base, ranking, **common
        )
        save(False)
    if args.batch and main_k:
        result["batches"] = B.bench_batches(
            model, prompts, main_k, args.batch, args.new_tokens, base, reference=greedy_tokens, **common
        )
        save(False)
    if args.ablate is not None and main_k:
        result["ablation"] = B.bench_ablation(
            model,
            prompts,
            main_k,
            args.new_tokens,
            base,
            switches=args.ablate or list(ABLATION_SWITCHES),
            on_row=lambda rows: (result.update(ablation=rows), save(False)),
            **common,
        )
    save(True)
    g = result["greedy"]
    phases = lambda r: "".join(f", {n[:-3]} {r[n]:.2f} ms" for n in ("verify_ms", "draft_ms") if n in r)
    print(
        f"greedy: {g['tokens_per_second']:.1f} tok/s ({g['step_ms']:.2f} ms/step{phases(g)}); "
        f"main loss {main_loss['main_loss']}"
    )
    for r in result["speculative"]:
        print(
            f"k={r['k']}: {r['tokens_per_second']:.1f} tok/s, {r['tokens_per_step']:.2f} tok/step, "
            f"step cost {r['step_cost_vs_greedy']:.2f}x, speedup {r['speedup']:.2f}x, "
            f"identical to greedy on {r['matching_prompts']}/{len(prompts)} prompts{phases(r)}"
        )
    return 0


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())
