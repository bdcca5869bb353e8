"""Shared fixtures of the trainer tests: a synthetic corpus, its tokenizer and indexed dataset, tiny configs,
and a launcher that starts the real CLI as N rank processes (srun style, so every rank's exit code is seen).

The corpus is generated text with structure a 2-layer model learns within a few dozen steps (a fixed
Markov chain over pseudo-words), tokenised with a ByteLevel BPE of 512 entries: 512 pads to 512 at TP1 and
TP2 alike (make_vocab_size_divisible_by=128), so checkpoints move between the two layouts.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
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
        "model": {
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "make_vocab_size_divisible_by": 128,
        },
        "mtp": {"num_heads": 2, "mtpd": {"topn": 64}},
        "data": {"tokenizer": str(tok), "paths": [str(prefix)], "split": "90,10,0", "seq_length": 32},
        "training": {
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "train_iters": 10,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "lr_warmup_iters": 2,
            "eval_interval": 0,
            "device": "cpu",
        },
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
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


class Rank:
    """One rank process, in its own process group (as srun starts tasks), output captured in files."""

    def __init__(self, cmd: list[str], env: dict, out_dir: Path, rank: int):
        self.out_path, self.err_path = out_dir / f"rank{rank}.out", out_dir / f"rank{rank}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    def signal_group(self, sig: int) -> None:
        """Signal every process of the rank (Slurm signals all processes of a job step)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.signal_group(signal.SIGKILL)  # helpers a killed rank leaves behind (as Slurm's cleanup would)
        return rc, self.out_path.read_text(), self.err_path.read_text()


class _ForkedProc:
    """The part of Popen that Rank and signal_when use, for a child of the fork server."""

    def __init__(self, server, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float) -> int:
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked rank {self.pid}", timeout)
        return self.returncode


class ForkedRank(Rank):
    """A rank forked by the fork server (tests/forkserver.py): same interface as Rank."""

    def __init__(
        self, server, args: list[str], env: dict, out_dir: Path, rank: int, module: str, prelude: Optional[str]
    ):
        self.out_path, self.err_path = out_dir / f"rank{rank}.out", out_dir / f"rank{rank}.err"
        self.out_path.touch()
        self.err_path.touch()
        self.proc = _ForkedProc(server, server.start(args, env, self.out_path, self.err_path, module, prelude))


_SERVER = None


def fork_server():
    """The process-wide fork server (started on first use, ~6 s; each run it forks starts in ~1 s)."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        import tempfile

        from forkserver import ForkServer

        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        log = Path(tempfile.mkdtemp(prefix="mtpd-forkserver-")) / "server.err"
        _SERVER = ForkServer(env, ROOT, log)
        atexit.register(_SERVER.close)
    return _SERVER


def start(
    args: list[str],
    world: int = 1,
    prelude: Optional[str] = None,
    module: str = "mtpd_megatron.train",
    fork: bool = False,
) -> list[Rank]:
    """Start `python -m MODULE ARGS` (the trainer by default) as `world` rank processes (srun style).

    `prelude` is Python run before the module's main() in each process (used to kill a rank mid-save).
    `fork=True` forks the ranks from the fork server instead of starting interpreters (same behaviour,
    ~6 s less start-up per process).
    """
    import tempfile

    from distributed_harness import free_port

    port = free_port()
    if fork:
        out_dir = Path(tempfile.mkdtemp(prefix="mtpd-ranks-"))
        atexit.register(shutil.rmtree, out_dir, True)
        server = fork_server()
        return [ForkedRank(server, args, _env(r, world, port), out_dir, r, module, prelude) for r in range(world)]
    if prelude is None:
        cmd = [PYTHON, "-m", module, *args]
    else:
        code = prelude + f"\nimport sys\nfrom {module} import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [PYTHON, "-c", code, *args]
    out_dir = Path(tempfile.mkdtemp(prefix="mtpd-ranks-"))
    atexit.register(shutil.rmtree, out_dir, True)
    return [Rank(cmd, _env(r, world, port), out_dir, r) for r in range(world)]


def wait(ranks: list[Rank], timeout: float = 240) -> list[tuple[int, str, str]]:
    """[(returncode, stdout, stderr)] per rank; every rank is killed if one overruns."""
    deadline = time.time() + timeout
    try:
        return [r.finish(max(1.0, deadline - time.time())) for r in ranks]
    except subprocess.TimeoutExpired:
        for r in ranks:
            r.signal_group(signal.SIGKILL)
        raise


def run(
    args: list[str],
    world: int = 1,
    timeout: float = 240,
    prelude: Optional[str] = None,
    fork: bool = False,
    module: str = "mtpd_megatron.train",
):
    """Run to completion; returns [(returncode, stdout, stderr)] per rank."""
    return wait(start(args, world, prelude, module=module, fork=fork), timeout)


def signal_when(ranks: list[Rank], marker: str, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
    """Once rank 0's output shows `marker`, send `sig` to every process of every rank."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker in ranks[0].out_path.read_text():
            for r in ranks:
                r.signal_group(sig)
            return
        if ranks[0].proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"never saw {marker!r} in rank 0's output:\n{ranks[0].out_path.read_text()}")


def read_metrics(log_dir: Path, kind: str = "train") -> dict[int, dict]:
    """metrics.jsonl -> {step: record}; a step logged twice (re-run after a resume) keeps the last record."""
    records = {}
    with open(log_dir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                records[r["step"]] = r
    return records
