"""Shared fixtures of the trainer tests: a synthetic corpus, its tokenizer and indexed dataset, tiny configs,
and a launcher that starts the real CLI as N rank processes (srun style, so every rank's exit code is seen).

The corpus is generated text with structure a 2-layer model learns within a few dozen steps (a fixed
Markov chain over pseudo-words), tokenised with a ByteLevel BPE of 512 entries: 512 pads to 512 at TP1 and
TP2 alike (make_vocab_size_divisible_by=128), so checkpoints move between the two layouts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VOCAB = 512


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnoprstuvwy"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(n)]


def write_corpus(path: Path, docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = _words(rng, 300)
    nxt = {w: rng.sample(words, 3) for w in words}  # each word is followed by one of 3 others
    with open(path, "w") as f:
        for _ in range(docs):
            w, out = rng.choice(words), []
            for _ in range(rng.randint(40, 120)):
                out.append(w)
                w = rng.choice(nxt[w])
            f.write(json.dumps({"text": " ".join(out) + "."}) + "\n")
    return path


def make_data(root: Path) -> tuple[Path, Path]:
    """(tokenizer.json, dataset prefix) under `root`; built once per directory."""
    from mtpd_megatron.data.indexed import preprocess
    from mtpd_megatron.data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "corpus_text_document"
    tok = root / "tok" / "tokenizer.json"
    if not (prefix.with_suffix(".idx")).exists():
        corpus = write_corpus(root / "corpus.jsonl")
        train_tokenizer([corpus], root / "tok", vocab_size=VOCAB, min_frequency=1)
        preprocess([corpus], tok, prefix, append_eod=True, progress=False)
    return tok, prefix


def tiny_config(tok: Path, prefix: Path, save: Optional[Path], **sections) -> dict:
    """A 2-layer h=64 model with 2 MTP heads; `sections` are merged into the dict (one level deep)."""
    cfg = {
        "name": "test",
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                  "max_position_embeddings": 64, "make_vocab_size_divisible_by": 128},
        "mtp": {"num_heads": 2, "mtpd": {"topn": 64}},
        "data": {"tokenizer": str(tok), "paths": [str(prefix)], "split": "90,10,0", "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 10, "lr": 3e-3,
                     "min_lr": 3e-4, "lr_warmup_iters": 2, "eval_interval": 0, "device": "cpu"},
        "checkpoint": {"save": str(save) if save else None, "keep_last": 0},
        "logging": {"log_interval": 1, "progress_bar": "off"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def start(args: list[str], world: int = 1, prelude: Optional[str] = None) -> list[subprocess.Popen]:
    """Start `python -m mtpd_megatron.train ARGS` as `world` rank processes (srun style).

    `prelude` is Python run before the trainer's main() in each process (used to kill a rank mid-save).
    """
    from mtpd_megatron.testing.distributed import free_port

    port = free_port()
    if prelude is None:
        cmd = [PYTHON, "-m", "mtpd_megatron.train", *args]
    else:
        code = prelude + "\nimport sys\nfrom mtpd_megatron.train import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [PYTHON, "-c", code, *args]
    return [subprocess.Popen(cmd, cwd=ROOT, env=_env(r, world, port), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world)]


def wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def run(args: list[str], world: int = 1, timeout: float = 240, prelude: Optional[str] = None):
    """Run to completion; returns [(returncode, stdout, stderr)] per rank."""
    return wait(start(args, world, prelude), timeout)


def signal_when(procs: list[subprocess.Popen], marker: str, sig: int = signal.SIGTERM, timeout: float = 120):
    """Read rank 0's stdout until a line contains `marker`, then send `sig` to every rank; return lines read."""
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = procs[0].stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            for p in procs:
                p.send_signal(sig)
            return lines
    raise AssertionError(f"never saw {marker!r} in rank 0's output:\n{''.join(lines)}")


def read_metrics(log_dir: Path, kind: str = "train") -> dict[int, dict]:
    """metrics.jsonl -> {step: record}; a step logged twice (re-run after a resume) keeps the last record."""
    records = {}
    with open(log_dir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                records[r["step"]] = r
    return records
