#!/usr/bin/env python3
"""Decode-width GEMMs of a preset (y = x W^T for 1-8 rows): cuBLAS against inductor's autotuned kernel -> JSON.

    python3 tools/bench_gemv.py --config configs/dense_2b.yaml --rows 1 5 --out $OUT/gemv.json
    python3 tools/bench_gemv.py --config configs/gpu_small.yaml --vocab-size 8192 --only linear_fc2 --rows 1

Why: at batch 1 a decoding step is its weight reads. The compiled dense_2b greedy step spends 1.35 of its
1.94 ms in cuBLASLt GEMVs running at 1.7-3.4 TB/s (docs/benchmarks.md, run 9), while the card streams ~4.8.
This answers, per weight shape of the model (linear_qkv, linear_proj, fc1, fc2, the output layer, the heads'
eh_proj, and with --draft-vocab the heads' restricted output layer), how fast the same product can be:
  cublas     F.linear, what megatron's layers run (cuBLASLt picks the kernel);
  inductor   torch.compile(mode="max-autotune-no-cudagraphs") of the same F.linear: inductor benchmarks its
             Triton GEMM templates against cuBLAS for that shape and keeps the fastest, i.e. what the decoder's
             `compile_mode` max-autotune-no-cudagraphs runs (a few seconds of autotuning per shape).
Each figure is the median over 5 replays of one CUDA graph of >= 48 calls that rotate over enough copies of
the weight (>= 256 MB in all) that no call finds its weight in L2: what a decoding step sees. The compiled
result is checked against an fp32 product (max error relative to max |y|). Nothing here changes the decoder.
(Commit 062771b also swept a hand-written split-K Triton GEMV; inductor's choice beat it on every layer shape,
docs/benchmarks.md run 10, so it was dropped.)
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "bench_gemv"
ROTATE_BYTES = 256 * 2**20
MIN_CALLS = 48


def weight_shapes(model, vocab=None, draft_vocab=()) -> dict:
    """{name: (N, K)} of the y = x W^T products in one decoding step of a model config (`config.model`), with
    `vocab` (default model.vocab_size) padded as megatron pads it at TP 1."""
    from mtpd_megatron.config.params import padded_vocab

    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    d = model.kv_channels or h // heads
    vocab = vocab or model.vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is null in this config (read from a tokenizer): pass --vocab-size")
    vocab = padded_vocab(vocab, model.make_vocab_size_divisible_by, 1)
    shapes = {
        "linear_qkv": ((heads + 2 * groups) * d, h),
        "linear_proj": (h, heads * d),
        "linear_fc1": (2 * model.ffn_hidden_size, h),  # SwiGLU: gate and up in one weight
        "linear_fc2": (h, model.ffn_hidden_size),
        "output_layer": (vocab, h),
        "mtp_eh_proj": (h, 2 * h),
    }
    for size in draft_vocab:
        shapes[f"output_layer_draft{size}"] = (size, h)
    return shapes


def time_calls(fn_of_copy, copies: int, calls: int, device) -> float:
    """Median microseconds per call over 5 replays of one CUDA graph of `calls` calls (copy i % copies)."""
    import torch

    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 2 * copies)):
            fn_of_copy(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn_of_copy(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def bench_shape(name, n, k, rows, device, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
    calls = -(-max(MIN_CALLS, copies) // copies) * copies
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k**-0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
    ref = F.linear(x.float(), weights[0].float())
    row = {"name": name, "N": n, "K": k, "rows": rows, "weight_MB": round(nbytes / 1e6, 2), "copies": copies}

    def record(label, us):
        row[f"{label}_us"] = round(us, 2)
        row[f"{label}_TBps"] = round(nbytes / (us * 1e-6) / 1e12, 2)

    record("cublas", time_calls(lambda i: F.linear(x, weights[i]), copies, calls, device))
    t0 = time.perf_counter()
    torch._dynamo.reset()  # one compile per shape: past dynamo's recompile limit (8) it would silently run eager
    compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    out = compiled(x, weights[0])
    row["inductor_compile_s"] = round(time.perf_counter() - t0, 1)
    row["inductor_rel_err"] = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    record("inductor", time_calls(lambda i: compiled(x, weights[i]), copies, calls, device))
    return row


def parse_args(argv=None):
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset whose model shapes are measured (configs/*.yaml)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5], help="rows per product (batch x positions)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default: the config's model.vocab_size)")
    p.add_argument("--draft-vocab", type=int, nargs="*", default=[], help="also the heads' restricted output layer")
    p.add_argument("--only", nargs="*", default=None, help="measure only these shapes (names as printed)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if any(r < 1 or r > 16 for r in args.rows):
        p.error(f"--rows {' '.join(map(str, args.rows))}: each must be in 1..16 (decode widths)")
    if args.draft_vocab and min(args.draft_vocab) < 1:
        p.error(f"--draft-vocab {' '.join(map(str, args.draft_vocab))}: each size must be >= 1")
    if args.vocab_size is not None and args.vocab_size < 1:
        p.error(f"--vocab-size {args.vocab_size}: must be >= 1")
    return args


def main(argv=None) -> int:
    from mtpd_megatron.cli import report_error, source_commit

    args = parse_args(argv)
    try:
        from mtpd_megatron.config.load import load_config

        cfg = load_config(args.config, args.overrides)
        shapes = weight_shapes(cfg.model, args.vocab_size, args.draft_vocab)
    except (ValueError, OSError) as e:
        return report_error(PROG, e)
    if args.only:
        unknown = sorted(set(args.only) - set(shapes))
        if unknown:
            return report_error(PROG, f"--only {' '.join(unknown)}: not a shape of this model ({', '.join(shapes)})")
        shapes = {k: v for k, v in shapes.items() if k in args.only}
    import torch

    if not torch.cuda.is_available():
        return report_error(PROG, "needs a CUDA device (the products are timed in CUDA graphs on the GPU)")
    device = torch.device("cuda")
    result = {"config": args.config, "device": torch.cuda.get_device_name(), "commit": source_commit(), "rows": []}
    for rows in args.rows:
        for name, (n, k) in shapes.items():
            row = bench_shape(name, n, k, rows, device, torch.bfloat16)
            result["rows"].append(row)
            line = (
                f"{name:>24} rows={rows} {row['weight_MB']:>7} MB  cublas {row['cublas_us']:>7} us "
                f"{row['cublas_TBps']} TB/s  inductor {row['inductor_us']:>7} us {row['inductor_TBps']} TB/s"
            )
            print(line, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
