"""A throwaway two-node Slurm cluster on this machine, for tests of the slurm/ launch scripts.

`SlurmCluster` writes a slurm.conf into a private run directory, starts a private munged (own key and
socket, so it never touches or depends on a system munge), one slurmctld and one slurmd per emulated node
(n1, n2: both on 127.0.0.1 with their own ports), waits until the nodes are idle and tears everything down
by pid. Facts behind the settings: /work/shared/research/slurm.md (Slurm 22.05, Debian, no systemd).

Use from any test module::

    from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.submit(["-n", "2", "--wrap", "srun hostname"])
        info = slurm_cluster.wait_for_job(job, timeout=60)
        assert info.state == "COMPLETED", slurm_cluster.diagnostics(job)

Slurm is installed with tools/install_slurm.sh if missing and MTPD_INSTALL_SLURM=1; the tests are skipped (with the installer's
output in the reason) only when that install fails. Set MTPD_SLURM_KEEP=1 to keep the run directory
(logs, state) after the session.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO_ROOT / "tools" / "install_slurm.sh"
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel", "munged")

# States after which a job will not run again on its own (REQUEUE*/PREEMPTED are transient when requeued).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


def _which(cmd: str) -> Optional[str]:
    return shutil.which(cmd) or (f"/usr/sbin/{cmd}" if os.access(f"/usr/sbin/{cmd}", os.X_OK) else None)


INSTALL_ENV = "MTPD_INSTALL_SLURM"


def ensure_slurm_installed() -> None:
    """Skip unless Slurm + munge are installed; install them (apt, needs root) only when asked.

    Installing system packages is a system-wide change, so the test command never does it by itself: CI
    (.ci/run) and users who want the real-Slurm tests set MTPD_INSTALL_SLURM=1."""
    if all(_which(c) for c in REQUIRED_COMMANDS):
        return
    if os.environ.get(INSTALL_ENV) != "1":
        pytest.skip(
            f"Slurm is not installed: real-Slurm tests skipped ({INSTALL_ENV}=1 bash tools/test.sh "
            f"installs slurm + munge with apt-get, as root)"
        )
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        pytest.skip(
            f"Slurm is not installed and {INSTALL_SCRIPT.relative_to(REPO_ROOT)} failed "
            f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}"
        )
    missing = [c for c in REQUIRED_COMMANDS if not _which(c)]
    if missing:
        raise RuntimeError(f"install_slurm.sh succeeded but {missing} are still missing:\n{proc.stdout}")


def _free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _is_alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (a zombie still answers kill -0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


def parse_scontrol_record(text: str) -> dict[str, str]:
    """`scontrol -o show ...` one-line record -> {Key: value}. Values may contain spaces."""
    fields: dict[str, str] = {}
    # A key starts after a space and looks like Word= (keys may contain '/', ':' e.g. Socks/Node).
    for m in re.finditer(r"(?:^|\s)([A-Za-z][\w/:]*)=(.*?)(?=\s[A-Za-z][\w/:]*=|$)", text.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


@dataclasses.dataclass
class JobInfo:
    job_id: str
    state: str  # JobState, e.g. COMPLETED, RUNNING, PENDING
    exit_code: str  # "rc:signal", e.g. "0:0"
    restarts: int
    reason: str
    fields: dict[str, str]

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class SlurmCluster:
    """A private Slurm controller + N slurmd on localhost. Not thread-safe; one per test session."""

    def __init__(self, run_dir: Path, nodes: Iterable[str] = ("n1", "n2"), cpus_per_node: int = 2):
        self.run_dir = Path(run_dir)
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf_path = self.run_dir / "slurm.conf"
        self.munge_socket = self.run_dir / "munge.sock"
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_files: list = []
        self._old_slurm_conf: Optional[str] = None

    # ------------------------------------------------------------------ setup / teardown
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass to subprocesses that run Slurm clients."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def _real_memory_mb(self) -> int:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"RealMemory=(\d+)", out)
        total = int(m.group(1)) if m else 4096
        # Below what slurmd detects (a node whose RealMemory exceeds the real one is drained), split over
        # the emulated nodes that share this machine.
        return max(256, int(total * 0.8) // len(self.nodes))

    def write_config(self) -> None:
        (self.run_dir / "state").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.run_dir / "spool" / node).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        mem = self._real_memory_mb()
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        r = self.run_dir
        # A random first job id: jobs of concurrent clusters on this machine (other sessions) then get
        # different ids, so MASTER_PORTs derived from the job id do not collide on 127.0.0.1.
        first_job_id = random.randrange(1000, 30000)
        lines = [
            "ClusterName=mtpdtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            f"SlurmUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=5: the default (120 s) holds a requeued job back for two minutes.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # pgid: linuxproc left orphans of a trapped batch script alive across requeue.
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            f"FirstJobId={first_job_id}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.run_dir / f"{name}.stdout", "wb")
        self._log_files.append(log)
        self._procs[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # setsid: our signals/terminal never reach the daemons
        )

    def start(self, timeout: float = 60.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)  # munged insists that every directory above its socket is world-x
        self.write_config()
        key = self.run_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.run_dir}/munged.pid",
                f"--seed-file={self.run_dir}/munged.seed",
                f"--log-file={self.run_dir}/munged.log",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf_path)])
        self._old_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf_path)
        self._wait(self._all_idle, timeout, "all nodes idle")

    def _all_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.diagnostics()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")

    def stop(self) -> None:
        """Cancel every job, then SIGTERM the daemons by pid (slurmd first), SIGKILL after a grace period."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", str(os.getuid()), "--full"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.running_jobs():
                time.sleep(0.3)
        order = [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        leftovers = self._kill_job_leftovers()
        for name, proc in self._procs.items():
            assert proc.poll() is not None and not _is_alive(proc.pid), f"{name} (pid {proc.pid}) still alive"
        for f in self._log_files:
            f.close()
        if leftovers:
            warnings.warn("killed job processes left after the cluster stopped:\n" + "\n".join(leftovers), stacklevel=2)
        if self._old_slurm_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_slurm_conf

    def _kill_job_leftovers(self) -> list[str]:
        """SIGKILL job processes that outlived the daemons (slurmstepd, batch scripts, srun, tasks).

        They are recognised by SLURM_CONF=<this cluster's slurm.conf> in their initial environment, which
        slurmstepd inherits from slurmd and every job process from its submitter; this process and its
        ancestors are spared. Returns their command lines (normally none).
        """
        spare, pid = set(), os.getpid()
        while pid > 1:
            spare.add(pid)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        marker = f"SLURM_CONF={self.conf_path}".encode()
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in spare:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                os.kill(int(entry), signal.SIGKILL)
                killed.append(f"{entry}: {cmd}")
            except (OSError, ProcessLookupError):
                continue
        return killed

    # ------------------------------------------------------------------ jobs
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        proc = subprocess.run(argv, capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def submit(self, sbatch_args: list[str], env: Optional[dict] = None, cwd=None) -> str:
        """`sbatch --parsable ARGS` -> job id."""
        proc = self.run(["sbatch", "--parsable", *sbatch_args], env=env or self.env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> JobInfo:
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        f = parse_scontrol_record(out.splitlines()[0])
        return JobInfo(
            job_id=str(job_id),
            state=f.get("JobState", "?"),
            exit_code=f.get("ExitCode", "?"),
            restarts=int(f.get("Restarts", "0") or 0),
            reason=f.get("Reason", ""),
            fields=f,
        )

    def wait_for_job(self, job_id: str, timeout: float = 120.0, interval: float = 0.5) -> JobInfo:
        """Poll until the job is terminal (or pending with a never-satisfiable dependency)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.terminal or info.reason == "DependencyNeverSatisfied":
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {info.state} (reason {info.reason}) after {timeout:.0f}s\n"
                    + self.diagnostics(job_id)
                )
            time.sleep(interval)

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        self._wait(cond, timeout, what, interval)

    def running_jobs(self) -> list[str]:
        out = self.run(["squeue", "-h", "-o", "%i %T"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def diagnostics(self, job_id: Optional[str] = None, tail: int = 40) -> str:
        """Tails of the daemon logs (and the job's record and output file) for assertion messages."""
        parts = []
        if job_id is not None:
            proc = self.run(["scontrol", "show", "job", str(job_id)], check=False)
            parts.append(f"== scontrol show job {job_id}\n{proc.stdout}{proc.stderr}")
            out_file = parse_scontrol_record(proc.stdout.replace("\n", " ")).get("StdOut")
            if out_file and os.path.exists(out_file):
                parts.append(f"== {out_file}\n" + "".join(open(out_file, errors="replace").readlines()[-tail:]))
        for log in sorted(self.run_dir.glob("*.log")) + sorted(self.run_dir.glob("*.stdout")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node cluster (n1, n2; 2 CPUs each) for the whole session; SLURM_CONF exported."""
    ensure_slurm_installed()
    run_dir = Path(tempfile.mkdtemp(prefix="mtpd-slurm-"))
    cluster = SlurmCluster(run_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("MTPD_SLURM_KEEP") != "1":
            shutil.rmtree(run_dir, ignore_errors=True)
