#!/usr/bin/env python3
"""The README's main job: tiny MTP-D pretraining end to end, on CPU when there is no GPU (`bash tools/demo.sh`).

    corpus      runs/demo/data/corpus.jsonl        ~1 MB of public-domain text (tools/fetch_corpus.py)
    tokenizer   runs/demo/data/tokenizer.json      ByteLevel BPE, 2048 entries (tools/train_tokenizer.py)
    preprocess  runs/demo/data/tokens/corpus.*     megatron .bin/.idx (tools/preprocess_data.py)
    pretrain    runs/demo/checkpoints/iter_N       configs/tiny_dense.yaml: 2 layers, 4 MTP heads with MTP-D,
                                                   TP=2 on 2 ranks via torchrun
    report      per-head acceptance a_k, CAR_k and tau of the last validation, from metrics.jsonl
    acceptance  runs/demo/eval/acceptance.{json,png}   teacher-forced a_k, CAR_k, tau on held-out documents
                                                   (tools/eval_acceptance.py; TP=2 checkpoint read at TP=1)
    export      runs/demo/hf/                      Hugging Face safetensors + config (stock Qwen3 class; the MTP
                                                   heads in runs/demo/hf/mtp/, DeepSeek-V3 layout) (tools/convert_to_hf.py)
    decode      a prompt decoded self-speculatively with 4 drafted tokens per step: tokens/step, and a check
                that the output equals greedy decoding (tools/speculative_decode.py)

Each stage is skipped when its output exists, so a second run only reports (and an interrupted pretraining
resumes from its last checkpoint). About 4-5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Stage:
    name: str
    done: Callable[[argparse.Namespace], bool]
    run: Callable[[argparse.Namespace], None]


def paths(a: argparse.Namespace) -> dict[str, Path]:
    out = Path(a.out)
    return {
        "data": out / "data",
        "corpus": out / "data" / "corpus.jsonl",
        "tokenizer": out / "data" / "tokenizer.json",
        "tokens": out / "data" / "tokens" / "corpus",
        "ckpt": out / "checkpoints",
        "metrics": out / "checkpoints" / "tensorboard" / "metrics.jsonl",
        "eval": out / "eval",
        "hf": out / "hf",
    }


def sh(cmd: list[str]) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # torchrun's default, unsaid
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env)
    if rc != 0:
        raise SystemExit(f"demo: stage failed with exit code {rc}: {' '.join(str(c) for c in cmd)}")


def fetch_corpus(a):
    sh([PY, "tools/fetch_corpus.py", "--out", paths(a)["data"], "--max-bytes", a.max_bytes])


def train_tokenizer(a):
    sh([PY, "tools/train_tokenizer.py", "--input", paths(a)["corpus"], "--vocab-size", a.vocab_size,
        "--out", paths(a)["data"]])


def preprocess(a):
    p = paths(a)
    sh([PY, "tools/preprocess_data.py", "--input", p["corpus"], "--tokenizer", p["tokenizer"],
        "--output-prefix", p["tokens"], "--append-eod", "--workers", 2, "--quiet"])


def train_overrides(a) -> list[str]:
    p = paths(a)
    return [
        f"parallel.tensor_model_parallel_size={a.tp}",
        f"data.tokenizer={p['tokenizer']}",
        f"data.paths=[{p['tokens']}]",
        f"checkpoint.save={p['ckpt']}",
        f"training.train_iters={a.steps}",
        f"training.eval_interval={max(a.steps // 4, 1)}",
        "training.eval_iters=16",
        f"checkpoint.save_interval={max(a.steps // 4, 1)}",
    ]


def pretrain(a):
    sh([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}", "-m",
        "mtpd_megatron.train", "--config", a.config, "--resume", "auto", *train_overrides(a)])


def pretrained(a) -> bool:
    tracker = paths(a)["ckpt"] / "latest_checkpointed_iteration.txt"
    return tracker.is_file() and int(tracker.read_text().strip() or 0) >= a.steps


def report(a):
    evals = [r for r in map(json.loads, paths(a)["metrics"].read_text().splitlines()) if r["kind"] == "eval"]
    if not evals:
        raise SystemExit(f"demo: no validation record in {paths(a)['metrics']}")
    last = evals[-1]
    print(f"\nPer-head acceptance against the main head (teacher-forced, validation split, step {last['step']}):")
    print(f"  {'head':>4}  {'a_k':>6}  {'CAR_k':>6}  {'CE':>6}  {'KL':>6}")
    k = 1
    while f"mtp{k}/accept" in last:
        print(f"  {k:>4}  {last[f'mtp{k}/accept']:6.3f}  {last[f'mtp{k}/car']:6.3f}  "
              f"{last[f'mtp{k}/ce']:6.3f}  {last[f'mtp{k}/kl']:6.3f}")
        k += 1
    print(f"  expected tokens per verification step tau = {last['tau']:.3f}; validation loss {last['loss']:.3f}")
    print(f"  checkpoint: {paths(a)['ckpt']} (TensorBoard: {paths(a)['metrics'].parent})")


def acceptance(a):
    e = paths(a)["eval"]
    e.mkdir(parents=True, exist_ok=True)
    sh([PY, "tools/eval_acceptance.py", "--ckpt", paths(a)["ckpt"], "--split", "valid", "--num-samples", 32,
        "--out", e / "acceptance.json", "--plot", e / "acceptance.png"])


def export(a):
    sh([PY, "tools/convert_to_hf.py", "--ckpt", paths(a)["ckpt"], "--out", paths(a)["hf"]])


def decode(a):
    sh([PY, "tools/speculative_decode.py", "--ckpt", paths(a)["ckpt"], "--prompt", a.prompt, "--k", 4,
        "--new-tokens", 64])


STAGES = [
    Stage("corpus", lambda a: paths(a)["corpus"].is_file(), fetch_corpus),
    Stage("tokenizer", lambda a: paths(a)["tokenizer"].is_file(), train_tokenizer),
    Stage("preprocess", lambda a: paths(a)["tokens"].with_suffix(".idx").is_file(), preprocess),
    Stage("pretrain", pretrained, pretrain),
    Stage("report", lambda a: False, report),
    Stage("acceptance", lambda a: (paths(a)["eval"] / "acceptance.json").is_file(), acceptance),
    Stage("export", lambda a: (paths(a)["hf"] / "config.json").is_file(), export),
    Stage("decode", lambda a: False, decode),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="where data, checkpoints and logs go")
    p.add_argument("--config", default="configs/tiny_dense.yaml")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps")
    p.add_argument("--nproc", type=int, default=2, help="ranks started by torchrun")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="corpus size")
    p.add_argument("--prompt", default="Fellow-Citizens of the Senate and of the House of Representatives:",
                   help="prompt of the speculative decoding stage")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()
    for stage in STAGES:
        if stage.done(a):
            print(f"[demo] {stage.name}: done already, skipped", flush=True)
            continue
        print(f"[demo] {stage.name} ...", flush=True)
        t = time.time()
        stage.run(a)
        print(f"[demo] {stage.name}: {time.time() - t:.0f} s", flush=True)
    print(f"[demo] finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
