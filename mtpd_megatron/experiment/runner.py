"""Run an experiment: train every arm (resumable, several at once on one GPU if asked), then evaluate each
finished arm with the project's own tools, one at a time, and write one result file per arm.

Phases, each skipping what is done:
  1. train   each arm is its own trainer process (`python -m mtpd_megatron.train`, or `looped run-stage`
             for an extension arm, started once its parent is trained); logs in <arm>/train.log; a trainer
             that stops resumes from its checkpoint next time. `parallel` processes share the device:
             small models leave most of a GPU idle, so arms train concurrently (wall-clock only; each
             arm's numbers are its own).
  2. evaluate  in this process, one arm after another (so decoding times are not disturbed): main-head
             validation loss/ppl and teacher-forced a_k/CAR_k/tau on the same held-out samples for every
             arm (inference/evaluation.py), the trunk-gradient diagnostic (experiment/gradients.py), and on
             a GPU real decoding of held-out prompts for K in evaluation.decode.k (inference/benchmark.py);
             extension arms are evaluated twice: the training-free copy (iteration 0) and the trained stage.
  3. report  results.json, results.md and the plots (experiment/report.py), rebuilt from the arm files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.checkpoint.atomic import write_atomic
from mtpd_megatron.config.load import ConfigError, dump_config
from mtpd_megatron.experiment.spec import ROOT, Arm, Experiment
from mtpd_megatron.parallel.launch import free_port

RESULT = "result.json"
_STEP = re.compile(r"step (\d+)/(\d+)")


def _say(line: str) -> None:
    print(f"[experiment] {line}", flush=True)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def final_checkpoint(arm: Arm) -> Optional[Path]:
    """The arm's checkpoint at its last iteration, if complete."""
    if arm.is_extension:
        from mtpd_megatron.looped import stages

        return stages.final_checkpoint(arm.config, 1)
    path = Path(arm.config.checkpoint.save) / layout.iter_dir_name(arm.config.training.train_iters)
    return path if path.is_dir() and layout.verify(path) is None else None


def initial_checkpoint(arm: Arm) -> Optional[Path]:
    """An extension arm's iteration-0 checkpoint: the training-free copy of the parent's heads."""
    from mtpd_megatron.looped import stages

    path = stages.stage_dir(arm.config, 1) / layout.iter_dir_name(0)
    return path if path.is_dir() and layout.verify(path) is None else None


def read_result(arm: Arm) -> Optional[dict]:
    path = arm.directory / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("config_hash") != arm.config_hash:
        raise ConfigError(
            f"arms.{arm.name}: {path} was produced by a different config (hash "
            f"{result.get('config_hash')} vs {arm.config_hash}); delete {arm.directory} to rerun it"
        )
    return result


def import_results(experiment: Experiment, path: str) -> list:
    """Seed the experiment directory with arm results of an earlier run (its results.json, e.g. the one
    committed under docs/results/): a later session then trains and evaluates only the missing arms. An arm
    whose config changed since is refused (one line naming it)."""
    try:
        previous = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--import {path}: not a readable results.json ({e.__class__.__name__})") from None
    imported = []
    for result in previous.get("arms", []):
        arm = experiment.arms.get(result.get("arm"))
        if arm is None:
            continue
        if result.get("config_hash") != arm.config_hash:
            raise ConfigError(
                f"--import {path}: arm {arm.name} was run with another config (hash "
                f"{result.get('config_hash')} vs {arm.config_hash}); leave it out or rerun it"
            )
        if not (arm.directory / RESULT).is_file():
            arm.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(arm.directory / RESULT, json.dumps(result, indent=1) + "\n")
            imported.append(arm.name)
    return imported


class _Job:
    def __init__(self, arm: Arm, proc: subprocess.Popen, log):
        self.arm, self.proc, self.log, self.start = arm, proc, log, time.time()

    def progress(self) -> str:
        steps = _STEP.findall(Path(self.log.name).read_text(errors="replace")[-20000:])
        if not steps:
            return f"{self.arm.name} starting"
        done, total = (int(x) for x in steps[-1])
        rate = done / max(time.time() - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0
        return f"{self.arm.name} {done}/{total} (ETA {_fmt_seconds(eta)})"


def _launch(arm: Arm) -> _Job:
    arm.directory.mkdir(parents=True, exist_ok=True)
    cfg_path = arm.directory / "config.yaml"
    write_atomic(cfg_path, dump_config(arm.config))
    if arm.is_extension:  # the parent's checkpoint directory is stage 0 of this arm's looped chain
        from mtpd_megatron.looped import stages

        stage0 = stages.stage_dir(arm.config, 0)
        stage0.parent.mkdir(parents=True, exist_ok=True)
        if not stage0.exists():
            parent_ckpt = Path(arm.config.checkpoint.save)  # the extension's config is the parent's
            os.symlink(os.path.relpath(parent_ckpt, stage0.parent), stage0)
        cmd = [sys.executable, "-m", "mtpd_megatron.looped", "run-stage", "--config", str(cfg_path), "--stage", "1"]
    else:
        cmd = [sys.executable, "-m", "mtpd_megatron.train", "--config", str(cfg_path), "--resume", "auto"]
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    log = open(arm.directory / "train.log", "a")
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return _Job(arm, proc, log)


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(empty log)"])[-1][:300]


def train_arms(arms: list, parallel: int = 1, poll_seconds: float = 15.0) -> list:
    """Train `arms` (those not finished), at most `parallel` at a time; returns the names that failed."""
    pending = [a for a in arms if final_checkpoint(a) is None]
    for a in arms:
        if a not in pending:
            _say(f"{a.name}: trained already ({final_checkpoint(a)})")
    running: list = []
    failed: list = []
    last_report = 0.0
    while pending or running:
        for job in list(running):
            code = job.proc.poll()
            if code is None:
                continue
            job.log.close()
            running.remove(job)
            took = _fmt_seconds(time.time() - job.start)
            if code == 0 and final_checkpoint(job.arm) is not None:
                _say(f"{job.arm.name}: trained in {took}")
            else:
                failed.append(job.arm.name)
                _say(
                    f"{job.arm.name}: training failed (exit {code}) after {took}: "
                    f"{_last_error(job.arm.directory / 'train.log')} (log: {job.arm.directory / 'train.log'})"
                )
        blocked = {n for n in failed}
        for arm in list(pending):
            parent = arm.spec.extend.parent if arm.is_extension else None
            if parent in blocked:
                pending.remove(arm)
                failed.append(arm.name)
                _say(f"{arm.name}: not trained (its parent {parent} failed)")
                continue
            if len(running) >= parallel:
                break
            if (
                parent is not None
                and any(j.arm.name == parent for j in running)
                or (parent is not None and any(a.name == parent for a in pending))
            ):
                continue
            pending.remove(arm)
            running.append(_launch(arm))
            _say(f"{arm.name}: training started ({arm.tokens / 1e6:.2f}M tokens, log {arm.directory / 'train.log'})")
        if running and time.time() - last_report >= poll_seconds:
            _say(
                "training: "
                + ", ".join(j.progress() for j in running)
                + (f"; {len(pending)} waiting" if pending else "")
            )
            last_report = time.time()
        if running:
            time.sleep(1.0)
    return failed


def _train_summary(arm: Arm) -> dict:
    """Throughput and the last validation record of the training run (its metrics.jsonl)."""
    path = Path(arm.config.logging.tensorboard_dir)
    if arm.is_extension:
        path = path / "stage_1"
    records = []
    if (path / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out = {}
    if train:
        steady = train[1:] or train  # the first interval holds compilation and warm-up
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in steady) / len(steady)
        out["step_time_s"] = sum(r["step_time_s"] for r in steady) / len(steady)
        out["final_train_loss"] = train[-1].get("loss")
    if evals:
        out["validation"] = {k: v for k, v in evals[-1].items() if k != "kind"}
    return out


def _device_name(loaded) -> str:
    import torch

    return torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu"


def evaluate_arm(experiment: Experiment, arm: Arm, samples_cache: dict, commit: str) -> dict:
    """Evaluate one trained arm (see the module docstring) and write its result file."""
    import torch

    from mtpd_megatron.experiment.gradients import trunk_gradients
    from mtpd_megatron.inference.evaluation import batches_of, evaluate_loaded
    from mtpd_megatron.inference.loading import load_for_inference, load_tokenizer_for, split_samples

    ev = experiment.file.evaluation
    t0 = time.time()
    checkpoints = [("trained", final_checkpoint(arm))]
    if arm.is_extension:
        checkpoints.insert(0, ("copy", initial_checkpoint(arm)))
    evaluated, decode, gradients, device = {}, None, None, "cpu"
    for tag, ckpt in checkpoints:
        if ckpt is None:
            raise ConfigError(f"arms.{arm.name}: no {tag} checkpoint to evaluate (train the arm first)")
        loaded = load_for_inference(str(ckpt))
        device = _device_name(loaded)
        if "samples" not in samples_cache:  # every arm is scored on the same held-out sequences
            tokenizer = load_tokenizer_for(loaded)
            samples_cache["samples"] = split_samples(loaded, tokenizer, ev.split, ev.num_samples)
            samples_cache["tokenizer"] = tokenizer
        samples = samples_cache["samples"]
        evaluated[tag] = evaluate_loaded(loaded, samples, batch_size=ev.batch_size, label=arm.name)
        if tag == "trained":
            decode = _decode(experiment, arm, loaded, samples_cache)
            if ev.gradient_batches and not arm.is_extension:
                grad_batches = batches_of(samples, ev.batch_size)[: ev.gradient_batches]
                gradients = trunk_gradients(loaded.model, loaded.cfg.mtp, grad_batches)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    main = evaluated["trained"]
    result = {
        "arm": arm.name,
        "note": arm.spec.note,
        "overrides": arm.spec.overrides,
        "extend": None if arm.spec.extend is None else vars(arm.spec.extend),
        "config_hash": arm.config_hash,
        "tokens": arm.tokens,
        "seed": arm.config.training.seed,
        "num_heads": main["num_heads"],
        "main_loss": main["main_loss"],
        "main_ppl": main["main_ppl"],
        "a": main.get("a"),
        "car": main.get("car"),
        "tau": main.get("tau"),
        "evaluation": evaluated,
        "decode": decode,
        "gradients": gradients,
        "train": _train_summary(arm),
        "device": device,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "eval_seconds": time.time() - t0,
    }
    write_atomic(arm.directory / RESULT, json.dumps(result, indent=1) + "\n")
    return result


def _decode(experiment: Experiment, arm: Arm, loaded, samples_cache: dict) -> Optional[dict]:
    """Greedy vs K drafts on held-out prompts, in the same decoder (None when the arm does not decode)."""
    from mtpd_megatron.inference.acceptance import num_heads
    from mtpd_megatron.inference.benchmark import bench
    from mtpd_megatron.inference.loading import split_samples

    spec = experiment.file.evaluation.decode
    heads = num_heads(loaded.model)
    on_gpu = loaded.device.type == "cuda"
    if not heads or not arm.spec.decode or spec.when == "never" or (spec.when == "cuda" and not on_gpu):
        return None
    ks = [k for k in spec.k if k <= heads]
    if "prompts" not in samples_cache:
        prompts = split_samples(
            loaded, samples_cache["tokenizer"], experiment.file.evaluation.split, spec.num_prompts, spec.prompt_len
        )
        samples_cache["prompts"] = [s["tokens"].tolist() for s in prompts]
    result, _ = bench(
        loaded.model,
        samples_cache["prompts"],
        ks,
        spec.new_tokens,
        repeats=spec.repeats,
        cuda_graphs=on_gpu,
        vocab_limit=loaded.vocab_size,
    )
    result.update(
        prompts=len(samples_cache["prompts"]),
        new_tokens=spec.new_tokens,
        repeats=spec.repeats,
        dtype=str(next(loaded.model.parameters()).dtype),
    )
    return result


def run(
    experiment: Experiment,
    names: list,
    *,
    parallel: int = 1,
    train: bool = True,
    evaluate: bool = True,
    commit: str = "unknown",
    on_arm: Optional[Callable] = None,
) -> int:
    """Train, evaluate and report the arms `names`; returns 0, or 1 when an arm failed (the rest completed)."""
    arms = [experiment.arms[n] for n in names]
    failed: list = []
    if train:
        _say(f"{experiment.name}: {len(arms)} arms, {parallel} at a time, output in {experiment.out}")
        failed = train_arms(arms, parallel)
    if evaluate:
        cache: dict = {}
        for i, arm in enumerate(arms, 1):
            if arm.name in failed:
                continue
            if read_result(arm) is not None:
                _say(f"{arm.name}: evaluated already ({arm.directory / RESULT})")
                continue
            if final_checkpoint(arm) is None:
                _say(f"{arm.name}: not trained yet, not evaluated")
                continue
            _say(f"evaluating {arm.name} ({i}/{len(arms)}) ...")
            result = evaluate_arm(experiment, arm, cache, commit)
            tau = f", tau {result['tau']:.3f}" if result.get("tau") else ""
            _say(f"{arm.name}: main loss {result['main_loss']:.4f}{tau} ({result['eval_seconds']:.0f} s)")
            if on_arm is not None:
                on_arm(result)
    from mtpd_megatron.experiment.report import write_report

    written = write_report(experiment)
    if written:
        _say(f"report: {', '.join(str(p) for p in written)}")
    return 1 if failed else 0
