"""Start many short trainer runs cheaply: one process imports torch, megatron-core and the trainer once,
then forks a fresh child per run (`python tests/forkserver.py` is the server).

Why: a trainer process spends ~5-7 s of its start on imports (torch, megatron-core, transformers through
megatron's tokenizers) on the 2-core test machines; a forked child starts training in about a second. The
fault tests run dozens of short trainers (kill -9 cycles, locks, corrupt checkpoints), so they use this;
each child is still a real, separate process: its own process group (gloo), signals, exit code, files,
and `os._exit` at the end, exactly as `python -m mtpd_megatron.train` would do after `main` returns.

Fork safety: the server only imports modules (no process group, no torch thread pool started: it runs with
OMP_NUM_THREADS=1 and never computes), so each child begins from a clean interpreter state.

Protocol: one JSON request per line on the server's stdin, one JSON answer per line on its stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# What the trainer imports lazily on its way (measured: 284 modules, most of them through these).
WARM = (
    "torch",
    "torch.distributed.checkpoint",
    "torch.utils.tensorboard",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader",
    "megatron.core.datasets.gpt_dataset",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "megatron.core.models.hybrid.hybrid_model",
    "megatron.core.tokenizers.text",
    "mtpd_megatron.train",
    "mtpd_megatron.trainer",
    "mtpd_megatron.looped.__main__",
    "mtpd_megatron.data",
    "mtpd_megatron.data.tokenizer",
    "mtpd_megatron.config.validate",
    "mtpd_megatron.parallel.launch",
    "mtpd_megatron.checkpoint.manager",
    "mtpd_megatron.checkpoint.lock",
    "transformers",
    "tokenizers",
    "psutil",
    "tqdm.auto",
)


# ---------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------


def _child(req: dict) -> None:
    """In the forked child: become a session leader, redirect output, run `module.main(args)`, exit."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        if req.get("prelude"):
            exec(compile(req["prelude"], "<prelude>", "exec"), {"__name__": "__prelude__"})
        import importlib

        module = importlib.import_module(req["module"])
        main = getattr(module, "main", None) or importlib.import_module(req["module"] + ".__main__").main
        result = main(req["args"])
        code = int(result or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash is a traceback on stderr and exit 1, as for a process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    import importlib

    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    finished: dict[int, int] = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req)
            answer = {"pid": pid}
        elif cmd in ("poll", "wait"):
            pid = req["pid"]
            deadline = time.time() + req.get("timeout", 0)
            while pid not in finished:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    finished[pid] = _status(status)
                    break
                if cmd == "poll" or time.time() > deadline:
                    break
                time.sleep(0.02)
            answer = {"rc": finished.get(pid)}
        else:
            answer = {"error": f"unknown command {cmd}"}
        print(json.dumps(answer), file=reply, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------


class ForkServer:
    """The client side: `start(...)` forks a run, `poll`/`wait` report its exit code (signals: negative)."""

    def __init__(self, env: dict, cwd: Path, log: Path):
        self.cwd = Path(cwd)
        with open(log, "w") as err:  # the server's own stderr (import warnings; a traceback if it fails)
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
            )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"the fork server did not start:\n{Path(log).read_text()[-3000:]}")

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(
        self,
        args: list[str],
        env: dict,
        out: Path,
        err: Path,
        module: str = "mtpd_megatron.train",
        prelude: Optional[str] = None,
    ) -> int:
        return self._ask(
            cmd="start",
            args=args,
            env=env,
            out=str(out),
            err=str(err),
            module=module,
            prelude=prelude,
            cwd=str(self.cwd),
        )["pid"]

    def poll(self, pid: int) -> Optional[int]:
        return self._ask(cmd="poll", pid=pid)["rc"]

    def wait(self, pid: int, timeout: float) -> Optional[int]:
        return self._ask(cmd="wait", pid=pid, timeout=timeout)["rc"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve()
