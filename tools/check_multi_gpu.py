#!/usr/bin/env python3
"""Multi-GPU check (issue 19): parallel layouts train like one GPU, checkpoints reshard, throughput per GPU.

    python3 tools/check_multi_gpu.py --config configs/gpu_small.yaml --gpus 4 --out $OUT/multi_gpu \\
        data.tokenizer=runs/exp_data/tokenizer.json data.paths=[runs/exp_data/tokens/corpus]
    python3 tools/check_multi_gpu.py --config configs/tiny_moe.yaml --gpus 2 --device cpu --out /tmp/mg   # gloo

Every run is the real trainer (`python -m mtpd_megatron.train` under torchrun, one process per GPU; NCCL on
CUDA, gloo on CPU), and every number is read from the runs' own metrics.jsonl (every step logged):
  1. reference: one process trains `--steps` + `--extra` steps, saving at `--resume-at` and at `--steps`;
  2. layouts: each resumes the reference's iter_<resume-at> checkpoint (one TP1 torch_dist checkpoint,
     resharded by megatron) in a layout of `--gpus` processes -- TP=N with sequence parallelism, PP=2, DP=N
     with the distributed optimizer; for MoE models EP=N and TP=2 x EP=2 -- and trains to `--steps`, saving
     there; its loss, grad norm and per-head CE / KL / acceptance must equal the reference's step by step
     within the tolerance (bf16 on GPU: relative 2e-2 for losses, absolute 2e-2 for acceptance; fp32 on CPU:
     1e-4);
  3. reshard: the first layout's iter_<steps> checkpoint (written by N processes) resumes on N/2 processes and
     on one, to `--steps + --extra`, against the reference's last steps;
  4. scaling: tokens/s per GPU of the reference (1 GPU) and of the DP=N layout, from the same logs.
Every run uses a constant LR after one warm-up step (a decaying schedule depends on train_iters, which
differs between the runs; the trainer has no early stop). The MoE auxiliary loss is set to 0: it is computed per rank and is not layout-invariant (the
same reason as tests/test_parallel_equivalence.py). Writes <out>/check.json and <out>/check.md and each run's
directory (config, stdout/stderr of rank 0, checkpoint, metrics.jsonl); exits 1 when a comparison fails.
  5. on CUDA, the loss bench at TP=N (`torchrun --nproc-per-node N tools/bench_mtpd_loss.py`, its JSON in
     <out>/loss_bench_tp<N>.json; reported, not compared).
Not covered: decoding at TP=2 (the decoder reshards a checkpoint to one process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mtpd_megatron  # noqa: F401  (import shims)
from mtpd_megatron.cli import cli_parser, run_cli

PROG = "check_multi_gpu"
ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "grad_norm")  # plus every per-head key of the reference's records (mtp<k>/ce, /kl, /accept...)
RATES = ("/accept", "/car", "/label_acc", "/topn_mass")  # fractions: compared absolutely
TOLERANCE = {"cuda": {"rel": 2e-2, "abs": 2e-2}, "cpu": {"rel": 1e-4, "abs": 1e-4}}


def parse_args(argv=None):
    p = cli_parser(PROG, __doc__)
    p.add_argument("--config", required=True, help="model/data config (configs/gpu_small.yaml, tiny_moe.yaml...)")
    p.add_argument("--gpus", type=int, required=True, help="processes per layout (2 or 4)")
    p.add_argument("--out", required=True, help="output directory (runs, check.json, check.md)")
    p.add_argument("--steps", type=int, default=20, help="steps of the layout runs")
    p.add_argument("--resume-at", type=int, default=10, help="the reference checkpoint the layouts start from")
    p.add_argument("--extra", type=int, default=5, help="steps after --steps for the resharded resumes")
    p.add_argument("--global-batch", type=int, default=None, help="training.global_batch_size (default: config)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    args = p.parse_args(argv)
    if args.gpus < 2 or args.gpus % 2:
        p.error(f"--gpus {args.gpus}: an even number >= 2 (the layouts split it in halves)")
    if not 0 < args.resume_at < args.steps:
        p.error(f"--resume-at {args.resume_at}: must be between 0 and --steps {args.steps}")
    if args.extra < 1:
        p.error(f"--extra {args.extra}: the resharded resumes need at least one step")
    return args


def layouts(gpus: int, moe: bool) -> dict:
    """{name: parallel.* overrides} of `gpus` processes."""
    out = {
        f"tp{gpus}_sp": {"tensor_model_parallel_size": gpus, "sequence_parallel": True},
        "pp2": {"pipeline_model_parallel_size": 2},
        f"dp{gpus}": {},
    }
    if moe:
        out = {f"ep{gpus}": {"expert_model_parallel_size": gpus}, **out}
        if gpus >= 4:
            out["tp2_ep2_sp"] = {
                "tensor_model_parallel_size": 2,
                "expert_model_parallel_size": 2,
                "sequence_parallel": True,
            }
    return out


def _parallel(world: int, **given) -> list:
    base = {
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "context_parallel_size": 1,
        "sequence_parallel": False,
        "use_distributed_optimizer": True,
    }
    base.update(given)
    return [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()]


class Runner:
    def __init__(self, args, moe: bool):
        self.args, self.moe = args, moe
        self.out = Path(args.out)

    def train(self, name: str, world: int, parallel: list, train_iters: int, save_interval: int, resume_from=None):
        """One trainer run under torchrun; returns {step: metrics record} of its metrics.jsonl."""
        a = self.args
        run_dir = self.out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        save = run_dir / "ckpt"
        save.mkdir(parents=True)
        if resume_from is not None:
            shutil.copytree(resume_from, save / resume_from.name)
        overrides = [
            *a.overrides,
            *parallel,
            f"training.train_iters={train_iters}",
            "training.lr_schedule=constant",  # the LR must not depend on train_iters: runs stop at different steps
            "training.lr_warmup_iters=1",
            f"training.device={a.device}",
            "training.eval_interval=0",
            f"checkpoint.save={save}",
            "checkpoint.load=null",
            f"checkpoint.save_interval={save_interval}",
            "checkpoint.keep_last=0",
            "checkpoint.async_save=false",
            "logging.log_interval=1",
            f"logging.tensorboard_dir={run_dir / 'logs'}",
            'logging.progress_bar="off"',
        ]
        if a.global_batch:
            overrides.append(f"training.global_batch_size={a.global_batch}")
        if self.moe:
            overrides.append("model.moe.aux_loss_coeff=0")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        cmd += ["-m", "mtpd_megatron.train", "--config", a.config, "--resume", "auto" if resume_from else "none"]
        cmd += overrides
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if a.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        print(f"[{PROG}] {name}: {world} process(es), to step {train_iters}", file=sys.stderr, flush=True)
        start = time.time()
        with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=a.timeout).returncode
        if rc != 0:
            lines = (run_dir / "stderr.txt").read_text().strip().splitlines()
            said = [line for line in lines if "error" in line.lower() and "elastic" not in line][:3] or lines[-3:]
            raise RuntimeError(
                f"{name}: trainer exit {rc} after {time.time() - start:.0f} s ({run_dir}): {' | '.join(said)}"
            )
        records = {}
        with open(run_dir / "logs" / "metrics.jsonl") as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "train":
                    records[r["step"]] = r
        return records


def compare(name: str, got: dict, ref: dict, steps: range, tol: dict) -> dict:
    """Each step's compared metrics within tolerance (relative for losses and norms, absolute for rates)."""
    worst, failures = {}, []
    for step in steps:
        if step not in got or step not in ref:
            failures.append(f"step {step} missing")
            continue
        keys = [k for k in ref[step] if k in COMPARED or k.startswith("mtp")]
        for key in keys:
            r, g = ref[step][key], got[step].get(key)
            if not isinstance(r, (int, float)) or isinstance(r, bool):
                continue
            if g is None:
                failures.append(f"step {step} {key} missing")
                continue
            rate = key.endswith(RATES)
            err = abs(g - r) if rate else abs(g - r) / max(abs(r), 1e-12)
            limit = tol["abs"] if rate else tol["rel"]
            worst[key] = max(worst.get(key, 0.0), err)
            if err > limit:
                failures.append(f"step {step} {key}: {g:.6g} vs {r:.6g}")
    return {"name": name, "ok": not failures, "worst": worst, "failures": failures[:10]}


def _invalid(args, parallel: list, world: int):
    """The config validator's one-line reason why this layout cannot run this config, or None."""
    from mtpd_megatron.config import load_config
    from mtpd_megatron.config.validate import validate

    extra = [f"training.global_batch_size={args.global_batch}"] if args.global_batch else []
    try:
        validate(load_config(args.config, [*args.overrides, *parallel, *extra]), world)
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


def _check(args) -> int:
    from mtpd_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)
    reason = _invalid(args, _parallel(1), 1)
    if reason is not None:  # the reference cannot run: one line, exit 2, nothing written
        raise ValueError(reason)
    moe = bool(cfg.model.moe.num_experts)
    tol = TOLERANCE[args.device]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, moe)
    result = {"config": args.config, "gpus": args.gpus, "device": args.device, "tolerance": tol, "runs": []}

    def save_result():
        (out / "check.json").write_text(json.dumps(result, indent=1))

    last = args.steps + args.extra
    try:
        ref = runner.train("reference_1", 1, _parallel(1), last, args.resume_at)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    # the reference saves at every multiple of resume_at; the reshard comparison needs iter_<steps> only from
    # the layouts, so the reference's own extra checkpoints are left as they are
    start = out / "reference_1" / "ckpt" / f"iter_{args.resume_at:07d}"
    tok_ref = [ref[s]["tokens_per_s"] for s in range(args.resume_at + 2, last + 1) if s in ref]
    first_layout = None
    for name, parallel in layouts(args.gpus, moe).items():
        reason = _invalid(args, _parallel(args.gpus, **parallel), args.gpus)
        if reason is not None:  # e.g. TP=4 with 2 query groups: reported, not run
            result["runs"].append({"name": name, "ok": True, "skipped": reason, "failures": []})
            print(f"[{PROG}] {name}: skipped ({reason})", flush=True)
            continue
        try:
            got = runner.train(name, args.gpus, _parallel(args.gpus, **parallel), args.steps, args.steps, start)
            row = compare(name, got, ref, range(args.resume_at + 1, args.steps + 1), tol)
            if name.startswith("dp"):
                tok = [got[s]["tokens_per_s"] for s in range(args.resume_at + 2, args.steps + 1) if s in got]
                result["scaling"] = {
                    "tokens_per_s_per_gpu_1": sum(tok_ref) / max(len(tok_ref), 1),
                    f"tokens_per_s_per_gpu_{args.gpus}": sum(tok) / max(len(tok), 1) / args.gpus,
                }
            first_layout = first_layout or (name if row["ok"] else None)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            row = {"name": name, "ok": False, "failures": [str(e)[:500]]}
        result["runs"].append(row)
        save_result()
        print(f"[{PROG}] {name}: {'ok' if row['ok'] else 'FAILED ' + '; '.join(row['failures'][:3])}", flush=True)
    if first_layout is not None:
        written = out / first_layout / "ckpt" / f"iter_{args.steps:07d}"
        for world in sorted({args.gpus // 2, 1}, reverse=True):
            name = f"reshard_{first_layout}_to_{world}"
            try:
                got = runner.train(name, world, _parallel(world), last, last, written)
                row = compare(name, got, ref, range(args.steps + 1, last + 1), tol)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                row = {"name": name, "ok": False, "failures": [str(e)[:500]]}
            result["runs"].append(row)
            save_result()
            print(f"[{PROG}] {name}: {'ok' if row['ok'] else 'FAILED ' + '; '.join(row['failures'][:3])}", flush=True)
    if args.device == "cuda":
        bench = out / f"loss_bench_tp{args.gpus}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"]
        cmd += [str(ROOT / "tools" / "bench_mtpd_loss.py"), "--out", str(bench)]
        print(f"[{PROG}] loss bench at TP={args.gpus}", file=sys.stderr, flush=True)
        with open(out / "loss_bench.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        result["loss_bench"] = {"rc": rc, "json": str(bench) if bench.is_file() else None}
    result["ok"] = all(r["ok"] for r in result["runs"])
    save_result()
    lines = [
        "| run | within tolerance | worst relative loss difference | worst per-head difference |",
        "|---|---|---|---|",
    ]
    for r in result["runs"]:
        worst = r.get("worst", {})
        head = max((v for k, v in worst.items() if k.startswith("mtp")), default=None)
        if r.get("skipped"):
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | |")
            continue
        lines.append(
            f"| {r['name']} | {'yes' if r['ok'] else 'no'} | "
            f"{worst.get('loss', float('nan')):.2e} | {'' if head is None else f'{head:.2e}'} |"
        )
    if "scaling" in result:
        lines.append("")
        lines += [f"- {k}: {v:.4g}" for k, v in result["scaling"].items()]
    (out / "check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[{PROG}] {'every run within tolerance' if result['ok'] else 'some runs FAILED'}: {out / 'check.json'}")
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)  # usage errors: one line, exit 2, before anything runs
    return run_cli(PROG, lambda _: _check(args), argv)


if __name__ == "__main__":
    sys.exit(main())
