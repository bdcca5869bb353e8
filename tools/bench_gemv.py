#!/usr/bin/env python3
"""Decode-width GEMMs of a preset (y = x W^T for 1-8 rows): cuBLAS against a split-K Triton GEMV -> JSON.

    python3 tools/bench_gemv.py --config configs/dense_2b.yaml --rows 1 5 --out $OUT/gemv.json
    python3 tools/bench_gemv.py --config configs/gpu_small.yaml --rows 1 5 --autotune --out $OUT/gemv_small.json

Why: at batch 1 a decoding step is its weight reads. The compiled dense_2b greedy step spends 1.35 of its
1.94 ms in cuBLASLt GEMVs running at 1.7-3.4 TB/s (docs/benchmarks.md, run 9), while the card streams ~4.8.
This answers, per weight shape of the model (linear_qkv, linear_proj, fc1, fc2, the output layer, the heads'
eh_proj, and with --draft-vocab the heads' restricted output layer), how fast the same product can be:
  cublas     F.linear, what megatron's layers run (cuBLASLt picks the kernel);
  triton     a split-K GEMV written for a handful of rows (below), the best of a small sweep of tile sizes;
             split-K partials are reduced by the last program of each column block in a fixed order, so the
             result is deterministic (an exact greedy and the verify must run bit-identical kernels);
  inductor   with --autotune: torch.compile(mode="max-autotune-no-cudagraphs") of the same F.linear, i.e.
             what `--compile-mode max-autotune-no-cudagraphs` would pick for that shape.
Each figure is the median over 5 replays of one CUDA graph of >= 48 calls that rotate over enough copies of
the weight (>= 256 MB in all) that no call finds its weight in L2: what a decoding step sees. Each Triton
result is checked against an fp32 product (max error relative to max |y|, printed). Nothing here changes
the decoder; a kernel that wins here is a candidate for it, measured again in tools/bench_decode.py.
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
    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    d = model.kv_channels or h // heads
    multiple = model.make_vocab_size_divisible_by
    vocab = vocab or model.vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is null in this config (read from a tokenizer): pass --vocab-size")
    vocab = -(-vocab // multiple) * multiple
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


def triton_gemv():
    """The split-K GEMV kernel and its launcher (imported lazily: triton is only needed here)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K_SPLIT, stride_xm, stride_wn, stride_ym,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_s * K_SPLIT + tl.arange(0, BLOCK_K)
        row_ok = rows[:, None] < M
        col_ok = cols[None, :] < N
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N] view of W [N, K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K_SPLIT, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs, mask=col_ok, other=0.0)
            acc += tl.dot(x, w)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        if SPLIT == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)
        else:
            # Partials [SPLIT, BLOCK_M, N] in fp32; the last program of this column block to arrive sums them in
            # split order (deterministic whatever the arrival order) and resets the counter for the next call.
            part_ptrs = part_ptr + pid_s * BLOCK_M * N + rows[:, None] * N + cols[None, :]
            tl.store(part_ptrs, acc, mask=col_ok)
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT):
                    p = part_ptr + s * BLOCK_M * N + rows[:, None] * N + cols[None, :]
                    total += tl.load(p, mask=col_ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok)
                tl.atomic_xchg(count_ptr + pid_n, 0)

    class Gemv:
        """y = x W^T for x [M <= BLOCK_M, K], W [N, K] contiguous, with fixed tiles; buffers made once."""

        def __init__(self, n, k, rows, block_n, block_k, split, num_warps, device, dtype):
            self.n, self.k, self.rows, self.split = n, k, rows, split
            self.block_m = max(16, triton.next_power_of_2(rows))  # tl.dot needs 16 rows; the rest are masked
            self.block_n, self.block_k, self.num_warps = block_n, block_k, num_warps
            self.out = torch.empty(rows, n, device=device, dtype=dtype)
            blocks = triton.cdiv(n, block_n)
            self.part = torch.empty(max(split, 1) * self.block_m * n if split > 1 else 1, device=device)
            self.count = torch.zeros(blocks, dtype=torch.int32, device=device)
            self.grid = (blocks, split)

        @staticmethod
        def valid(k, block_k, split) -> bool:
            return k % split == 0 and (k // split) % block_k == 0

        def __call__(self, x, w):
            _gemv_kernel[self.grid](
                x, w, self.out, self.part, self.count, self.rows, self.n, self.k // self.split,
                x.stride(0), w.stride(0), self.out.stride(0),
                SPLIT=self.split, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                num_warps=self.num_warps,
            )  # fmt: skip
            return self.out

    return Gemv


def sweep(n: int, k: int) -> list:
    """(block_n, block_k, split, num_warps) candidates: enough programs to cover the SMs at every N."""
    out = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256, 512):
            for split in (1, 2, 4, 8):
                if k % split or (k // split) % block_k:
                    continue
                programs = -(-n // block_n) * split
                if programs < 128 or programs > 8192:
                    continue
                for warps in (4, 8):
                    out.append((block_n, block_k, split, warps))
    return out


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


def bench_shape(name, n, k, rows, device, dtype, autotune: bool) -> dict:
    import torch
    import torch.nn.functional as F

    Gemv = triton_gemv()
    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
    calls = max(MIN_CALLS, copies)
    calls = -(-calls // copies) * copies
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k**-0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
    ref = F.linear(x.float(), weights[0].float())
    scale = ref.abs().max().item()
    row = {"name": name, "N": n, "K": k, "rows": rows, "weight_MB": round(nbytes / 1e6, 2), "copies": copies}

    def record(label, us):
        row[f"{label}_us"] = round(us, 2)
        row[f"{label}_TBps"] = round(nbytes / (us * 1e-6) / 1e12, 2)

    record("cublas", time_calls(lambda i: F.linear(x, weights[i]), copies, calls, device))
    best = None
    for block_n, block_k, split, warps in sweep(n, k):
        try:
            op = Gemv(n, k, rows, block_n, block_k, split, warps, device, dtype)
            err = (op(x, weights[0]).float() - ref).abs().max().item() / scale
            if err > 2e-2:
                row.setdefault("rejected", []).append([block_n, block_k, split, warps, err])
                continue
            us = time_calls(lambda i, op=op: op(x, weights[i]), copies, calls, device)
        except Exception as e:  # a tile that does not fit the card's shared memory or registers
            row.setdefault("failed", []).append([block_n, block_k, split, warps, type(e).__name__])
            continue
        if best is None or us < best[0]:
            best = (us, (block_n, block_k, split, warps), err)
    if best is not None:
        record("triton", best[0])
        row["triton_config"] = dict(zip(("block_n", "block_k", "split", "num_warps"), best[1]))
        row["triton_rel_err"] = best[2]
    if autotune:
        t0 = time.perf_counter()
        compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        compiled(x, weights[0])
        row["inductor_compile_s"] = round(time.perf_counter() - t0, 1)
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
    p.add_argument("--autotune", action="store_true", help="also inductor max-autotune per shape (slow)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if any(r < 1 or r > 16 for r in args.rows):
        p.error(f"--rows {' '.join(map(str, args.rows))}: each must be in 1..16 (decode widths)")
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
        return report_error(PROG, "needs a CUDA device (the Triton GEMV and CUDA-graph timing run on the GPU)")
    device = torch.device("cuda")
    result = {"config": args.config, "device": torch.cuda.get_device_name(), "commit": source_commit(), "rows": []}
    for rows in args.rows:
        for name, (n, k) in shapes.items():
            row = bench_shape(name, n, k, rows, device, torch.bfloat16, args.autotune)
            result["rows"].append(row)
            line = f"{name:>24} rows={rows} {row['weight_MB']:>7} MB  cublas {row['cublas_us']:>7} us {row['cublas_TBps']} TB/s"
            if "triton_us" in row:
                line += f"  triton {row['triton_us']:>7} us {row['triton_TBps']} TB/s {row['triton_config']}"
            if "inductor_us" in row:
                line += f"  inductor {row['inductor_us']} us {row['inductor_TBps']} TB/s"
            print(line, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
