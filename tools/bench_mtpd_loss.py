#!/usr/bin/env python3
"""Benchmark the MTP-D loss against plain megatron MTP cross-entropy and a full-vocabulary-gather KL.

All three run in one process group, on the same bf16 logits, fwd + bwd over every head:
  megatron_ce   megatron-core's vocab_parallel_cross_entropy per head (plain MTP, the bar to meet)
  gather_kl     CE + a KL computed after gathering the full vocabulary on every rank (the approach of
                Megatron-LM PR #5340)
  mtpd          ours: vocab-parallel CE + TopN KL (teacher statistics once, then one fused pass per head)
Time is the median of CUDA-event timings; memory is the peak allocated above the inputs.

    torchrun --nproc-per-node 2 tools/bench_mtpd_loss.py --out bench.json   # TP = number of processes
"""

from __future__ import annotations

import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mtpd_megatron  # noqa: F401  (import shims)
from mtpd_megatron.cli import cli_parser
from mtpd_megatron.mtpd.kl import DistillSpec, head_loss, teacher_stats, vocab_shard
from mtpd_megatron.mtpd.reference import reference_head_loss


def parse_args():
    p = cli_parser("bench_mtpd_loss.py", __doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=122_880)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topn", type=int, default=10_000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default="megatron_ce,gather_kl,mtpd,mtpd_eager,mtpd_reverse_tail")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one mtpd iteration")
    return p.parse_args()


def megatron_ce(logits, teacher, labels, group, args):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    total = 0.0
    for x in logits:
        total = total + vocab_parallel_cross_entropy(x.view(args.seq, args.batch, -1), labels).sum()
    total.backward()


def gather_kl(logits, teacher, labels, group, args):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    with torch.no_grad():
        t_full = gather_from_tensor_model_parallel_region(teacher).float().log_softmax(-1)
    total = 0.0
    for x in logits:
        ce = vocab_parallel_cross_entropy(x.view(args.seq, args.batch, -1), labels)
        full = gather_from_tensor_model_parallel_region(x).float()
        kl = F.kl_div(full.log_softmax(-1), t_full, log_target=True, reduction="none").sum(-1)
        total = total + ce.sum() + kl.sum()
    total.backward()


def mtpd(logits, teacher, labels, group, args, direction="forward", mode="renorm", compile=True):
    spec = DistillSpec(topn=args.topn, direction=direction, mode=mode, compile=compile)
    start, _ = vocab_shard(args.vocab, group)
    stats = teacher_stats(teacher, spec, args.vocab, start, group)
    flat = labels.reshape(-1)
    total = 0.0
    for x in logits:
        out = head_loss(
            x,
            teacher,
            stats,
            flat,
            alpha=1.0,
            beta=1.0,
            spec=spec,
            vocab_size=args.vocab,
            vocab_start=start,
            group=group,
            inplace_grad=True,
        )
        total = total + out.loss.sum()
    total.backward()


def check_against_reference(group, args, tokens=256):
    """Ours (compiled, bf16 inputs) vs the float64 reference on a slice; returns relative errors."""
    start, size = vocab_shard(args.vocab, group)
    g = torch.Generator(device="cuda").manual_seed(1)
    z_full = torch.randn(tokens, args.vocab, device="cuda", generator=g) * 3
    u_full = torch.randn(tokens, args.vocab, device="cuda", generator=g) * 3
    labels = torch.randint(0, args.vocab, (tokens,), device="cuda", generator=g)
    spec = DistillSpec(topn=args.topn)
    z = z_full[:, start : start + size].to(torch.bfloat16).requires_grad_(True)
    u = u_full[:, start : start + size].to(torch.bfloat16)
    out = head_loss(
        z,
        u,
        teacher_stats(u, spec, args.vocab, start, group),
        labels,
        alpha=1.0,
        beta=1.0,
        spec=spec,
        vocab_size=args.vocab,
        vocab_start=start,
        group=group,
    )
    out.loss.sum().backward()
    zr = z_full.to(torch.bfloat16).double().cpu().requires_grad_(True)
    ref, _, _ = reference_head_loss(
        zr,
        u_full.to(torch.bfloat16).double().cpu(),
        labels.cpu(),
        alpha=1.0,
        beta=1.0,
        topn=args.topn,
        direction="forward",
        mode="renorm",
        temperature=1.0,
    )
    ref.sum().backward()
    ref_grad = zr.grad[:, start : start + size]
    loss_err = ((out.loss.double().cpu() - ref.detach()).norm() / ref.detach().norm()).item()
    grad_err = ((z.grad.double().cpu() - ref_grad).norm() / ref_grad.norm()).item()
    return loss_err, grad_err


def main():
    args = parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    group = ps.get_tensor_model_parallel_group()
    tokens, local_v = args.seq * args.batch, args.vocab // world
    g = torch.Generator(device="cuda").manual_seed(0)
    pristine = [
        torch.randn(tokens, local_v, device="cuda", generator=g).mul_(3).to(torch.bfloat16) for _ in range(args.heads)
    ]
    teacher = torch.randn(tokens, local_v, device="cuda", generator=g).mul_(3).to(torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.seq, args.batch), device="cuda", generator=g)
    loss_err, grad_err = check_against_reference(group, args)

    methods = {
        "megatron_ce": megatron_ce,
        "gather_kl": gather_kl,
        "mtpd": mtpd,
        "mtpd_eager": lambda *a: mtpd(*a, compile=False),
        "mtpd_reverse_tail": lambda *a: mtpd(*a, direction="reverse", mode="tail"),
    }
    results = {}
    for name in args.methods.split(","):
        times, peaks = [], []
        for it in range(args.warmup + args.iters):
            logits = [p.clone().requires_grad_(True) for p in pristine]
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            methods[name](logits, teacher, labels, group, args)
            t1.record()
            torch.cuda.synchronize()
            if it >= args.warmup:
                times.append(t0.elapsed_time(t1))
                peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
            del logits
        results[name] = {"ms": statistics.median(times), "peak_extra_gib": max(peaks)}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        logits = [p.clone().requires_grad_(True) for p in pristine]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            mtpd(logits, teacher, labels, group, args)
            torch.cuda.synchronize()
        if rank == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    if rank == 0:
        base = results.get("megatron_ce")
        report = {
            "tp": world,
            "device": torch.cuda.get_device_name(),
            "args": vars(args),
            "check_rel_err": {"loss": loss_err, "grad": grad_err},
            "results": results,
        }
        print(
            f"TP={world} {torch.cuda.get_device_name()} V={args.vocab} s={args.seq} b={args.batch} "
            f"heads={args.heads} N={args.topn}  check: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e}"
        )
        print(f"{'method':<20}{'ms':>10}{'x CE':>8}{'peak GiB':>10}{'x CE':>8}")
        for name, r in results.items():
            rt = r["ms"] / base["ms"] if base else float("nan")
            rm = r["peak_extra_gib"] / base["peak_extra_gib"] if base else float("nan")
            print(f"{name:<20}{r['ms']:>10.1f}{rt:>8.2f}{r['peak_extra_gib']:>10.2f}{rm:>8.2f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
