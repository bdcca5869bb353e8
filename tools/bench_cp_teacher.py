#!/usr/bin/env python3
"""Benchmark: how MTP-D's teacher crosses context-parallel ranks (docs/design.md, "Context parallelism").

Three ways to give head k at local position t the main head's logits at global position t+k, measured on
the same data, each followed by the MTP-D loss of every head (forward + backward, our fused loss):
  lookahead    ours (parallel/context.py): each chunk receives the first K teacher rows of its successor once
               per micro-batch; head k's teacher is a view per chunk (one copy of the teacher: the concatenation)
  roll_logits  megatron's roll_tensor applied to the teacher logits [s, b, V] (and its statistics), once per
               head: a full copy of the teacher per head (torch.roll + concatenation)
  roll_hidden  roll_tensor applied to the main head's hidden states [s, b, h] once per head, the teacher's
               logits and statistics recomputed per head (an output-layer GEMM and a statistics pass per head)
  cp1          reference: the same local tokens at CP = 1 (the hook's slices; each rank alone, its loss not
               summed over ranks)
Reported per method: milliseconds per step (median) and the part spent aligning the teacher, peak memory
above the inputs, bytes sent per rank (counted at torch.distributed.isend), the loss (the three CP methods
must agree), and the alignment's own overhead: best of --align-reps of (teacher logits + alignment +
statistics for every head) minus the same for cp1, all methods interleaved in the same ranks.

CPU (gloo, each method in its own ranks: peak RSS above the inputs, /proc/self/clear_refs + VmHWM):
    python tools/bench_cp_teacher.py --cp 2 [--seq 2048 --vocab 16384 --hidden 512 --heads 4]
GPU (NCCL, one GPU per rank; CUDA peak allocated above the inputs):
    torchrun --nproc-per-node 2 tools/bench_cp_teacher.py --cp 2
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import mtpd_megatron  # noqa: F401  (import shims)
from mtpd_megatron.cli import cli_parser

METHODS = ("lookahead", "roll_logits", "roll_hidden", "cp1")


def parse_args(argv=None):
    p = cli_parser("bench_cp_teacher.py", __doc__.splitlines()[0])
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048, help="global sequence length (each rank holds seq / cp)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topn", type=int, default=1000)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--align-reps", type=int, default=10, help="repetitions of the alignment alone (best is kept)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the kernel's peak RSS of this process (VmHWM) to the current RSS; returns that, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _inputs(args, local: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(local, args.batch, args.hidden, generator=g).to(device, dtype) for _ in range(1 + args.heads)]
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.batch, local), generator=g).to(device)
    mask = (torch.rand(args.batch, local, generator=g) > 0.1).float().to(device)
    return h, weight, labels, mask


class _Clock:
    """Accumulates the time spent aligning the teacher (everything but the heads' logits and losses)."""

    def __init__(self, cuda: bool):
        self.cuda, self.total, self._t0 = cuda, 0.0, 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._t0


def _step(method: str, h, weight, labels, mask, group, args, clock: _Clock) -> float:
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    from mtpd_megatron.mtpd.kl import DistillSpec, TeacherStats, head_loss, teacher_stats
    from mtpd_megatron.parallel.context import Lookahead

    spec = DistillSpec(topn=args.topn)
    v, b, K = args.vocab, args.batch, args.heads
    cp_group = group if method != "cp1" else None
    common = dict(alpha=1.0, beta=1.0, spec=spec, vocab_size=v, vocab_start=0, inplace_grad=True)
    heads = [x.clone().requires_grad_(True) for x in h[1:]]
    s = h[0].shape[0]
    with torch.no_grad():
        teacher = h[0] @ weight.t()  # [s, b, V]
    lab, msk, total = labels, mask, 0.0
    with clock:
        if method == "lookahead":
            lookahead = Lookahead(s, K, cp_group)
            teacher = lookahead.extend(teacher).reshape(-1, v)
            stats = teacher_stats(teacher, spec, v, 0)
        elif method in ("roll_logits", "cp1"):
            stats = teacher_stats(teacher.reshape(-1, v), spec, v, 0)
    hidden_k, teacher_k = h[0], teacher
    for k in range(1, K + 1):
        roll = dict(shifts=-1, dims=-1, cp_group=cp_group)
        lab, _ = roll_tensor(lab, **roll)
        msk, _ = roll_tensor(msk, **roll)
        logits = (heads[k - 1] @ weight.t()).reshape(-1, v)
        if method == "lookahead":
            out = head_loss(
                logits, teacher, stats, lab.t().reshape(-1), teacher_offsets=lookahead.pieces(k, b), **common
            )
            m = msk.t().reshape(-1)
        elif method == "cp1":  # the hook at CP = 1: views teacher[k*b:], logits[:s-k]
            n = (s - k) * b
            out = head_loss(
                logits[:n], teacher.reshape(-1, v)[k * b :], stats[k * b :], lab.t()[: s - k].reshape(-1), **common
            )
            m = msk.t()[: s - k].reshape(-1)
        elif method == "roll_logits":
            with clock:
                teacher_k, _ = roll_tensor(teacher_k, shifts=-1, dims=0, cp_group=cp_group)
                stats = TeacherStats(
                    *(roll_tensor(x.view(s, b), shifts=-1, dims=0, cp_group=cp_group)[0].reshape(-1) for x in stats)
                )
            out = head_loss(logits, teacher_k.reshape(-1, v), stats, lab.t().reshape(-1), **common)
            m = msk.t().reshape(-1)
        else:  # roll_hidden
            with clock:
                hidden_k, _ = roll_tensor(hidden_k, shifts=-1, dims=0, cp_group=cp_group)
                with torch.no_grad():
                    t = (hidden_k @ weight.t()).reshape(-1, v)
                st = teacher_stats(t, spec, v, 0)
            out = head_loss(logits, t, st, lab.t().reshape(-1), **common)
            m = msk.t().reshape(-1)
        total = total + (out.loss * m).sum()
    total.backward()
    value = total.detach().double()
    if cp_group is not None:
        dist.all_reduce(value, group=cp_group)
    return value.item()


def _align_only(method: str, h, weight, group, args) -> None:
    """What each method does to give every head its teacher and statistics, without the heads' losses."""
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    from mtpd_megatron.mtpd.kl import DistillSpec, TeacherStats, teacher_stats
    from mtpd_megatron.parallel.context import Lookahead

    spec = DistillSpec(topn=args.topn)
    v, b, K = args.vocab, args.batch, args.heads
    cp_group = group if method != "cp1" else None
    s = h[0].shape[0]
    with torch.no_grad():
        teacher = h[0] @ weight.t()
        if method == "lookahead":
            lookahead = Lookahead(s, K, cp_group)
            teacher = lookahead.extend(teacher).reshape(-1, v)
            stats = teacher_stats(teacher, spec, v, 0)
            for k in range(1, K + 1):
                pieces = lookahead.pieces(k, b)
                TeacherStats(*(lookahead.align(x, pieces) for x in stats))
        elif method == "cp1":
            stats = teacher_stats(teacher.reshape(-1, v), spec, v, 0)
            for k in range(1, K + 1):
                teacher.reshape(-1, v)[k * b :], stats[k * b :]
        elif method == "roll_logits":
            stats = teacher_stats(teacher.reshape(-1, v), spec, v, 0)
            for _ in range(1, K + 1):
                teacher, _ = roll_tensor(teacher, shifts=-1, dims=0, cp_group=cp_group)
                stats = TeacherStats(
                    *(roll_tensor(x.view(s, b), shifts=-1, dims=0, cp_group=cp_group)[0].reshape(-1) for x in stats)
                )
        else:
            hidden = h[0]
            del teacher
            for _ in range(1, K + 1):
                hidden, _ = roll_tensor(hidden, shifts=-1, dims=0, cp_group=cp_group)
                t = (hidden @ weight.t()).reshape(-1, v)
                teacher_stats(t, spec, v, 0)
                del t


def _measure(method: str, args) -> dict:
    """On every rank of an initialised process group: this method's time, memory, bytes sent, loss."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        from mtpd_megatron.parallel import cpu_compat

        cpu_compat.enable()
    group = dist.new_group(list(range(dist.get_world_size())))
    local = args.seq // args.cp
    h, weight, labels, mask = _inputs(args, local, device, torch.bfloat16 if cuda else torch.float32)
    sent = [0]
    isend = torch.distributed.isend

    def counting_isend(tensor, *a, **kw):
        sent[0] += tensor.numel() * tensor.element_size()
        return isend(tensor, *a, **kw)

    torch.distributed.isend = counting_isend
    times, align, loss, base = [], [], None, 0
    for it in range(args.warmup + args.iters):
        if it == args.warmup:  # memory above the inputs, after the warm-up (lazy imports, allocator)
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = _reset_peak_rss()
        sent[0] = 0
        clock = _Clock(cuda)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        loss = _step(method, h, weight, labels, mask, group, args, clock)
        if cuda:
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            align.append(clock.total * 1e3)
    torch.distributed.isend = isend
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {
        "ms": statistics.median(times),
        "align_ms": statistics.median(align),
        "peak_extra_mib": (peak - base) / 2**20,
        "sent_bytes": sent[0],
        "loss": loss,
    }


def _align_overheads(methods, args) -> dict:
    """Best-of-reps time of each method's alignment minus that of the common part (the teacher's logits and
    one statistics pass: method "cp1"), the methods interleaved in the same ranks (a shared machine's load
    then hits them alike)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        from mtpd_megatron.parallel import cpu_compat

        cpu_compat.enable()
    group = dist.new_group(list(range(dist.get_world_size())))
    h, weight, _, _ = _inputs(args, args.seq // args.cp, device, torch.bfloat16 if cuda else torch.float32)
    best = {m: float("inf") for m in ["cp1", *(m for m in methods if m != "cp1")]}  # the same order on every rank
    for _ in range(args.align_reps):
        for m in best:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            _align_only(m, h, weight, group, args)
            if cuda:
                torch.cuda.synchronize()
            best[m] = min(best[m], (time.perf_counter() - t0) * 1e3)
    return {m: best[m] - best["cp1"] for m in methods}


def _spawned(method: str, args) -> dict:
    return _measure(method, args)


def _report(results: dict, args, device: str) -> None:
    print(
        f"CP={args.cp} {device} s={args.seq} (local {args.seq // args.cp}) b={args.batch} V={args.vocab} "
        f"h={args.hidden} heads={args.heads} N={args.topn}"
    )
    print(
        "step: teacher + alignment + every head's loss, fwd + bwd (median; its alignment part; peak above the "
        "inputs); align overhead: the alignment's best time minus cp1's (teacher logits + statistics once)"
    )
    print(
        f"{'method':<14}{'step ms':>10}{'of which align':>15}{'step peak MiB':>14}{'align overhead ms':>18}"
        f"{'sent KiB':>10}{'loss':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:<14}{r['ms']:>10.1f}{r['align_ms']:>15.1f}{r['peak_extra_mib']:>14.1f}"
            f"{r.get('align_overhead_ms', float('nan')):>18.1f}{r['sent_bytes'] / 1024:>10.1f}{r['loss']:>16.4f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=2)


def main(argv=None):
    args = parse_args(argv)
    methods = args.methods.split(",")
    if "RANK" in os.environ:  # torchrun: one process group for all methods (GPU: NCCL)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        results = {m: _measure(m, args) for m in methods}
        for m, overhead in _align_overheads(methods, args).items():
            results[m]["align_overhead_ms"] = overhead
        if dist.get_rank() == 0:
            _report(results, args, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        dist.destroy_process_group()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the CPU run uses the test harness
    from distributed_harness import run_distributed

    results = {}
    for m in methods:  # CPU: each method in fresh ranks (cp1 too: each rank alone, under the same load)
        results[m] = run_distributed(_spawned, args.cp, m, args)[0]
        print(f"# {m}: {json.dumps(results[m])}", flush=True)
    for m, overhead in run_distributed(_align_overheads, args.cp, methods, args)[0].items():
        results[m]["align_overhead_ms"] = overhead
    _report(results, args, "cpu (gloo)")


if __name__ == "__main__":
    main()
