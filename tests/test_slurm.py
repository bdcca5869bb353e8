"""The slurm/ launch scripts on a real (throwaway, two-node, one-machine) Slurm cluster.

The scripts run unmodified; only the program that srun starts is swapped for tests/slurm_probe_trainer.py
(a real gloo job with the trainer's CLI/env/checkpoint/exit-75 contract) through the knobs the scripts
support anyway. That substitution lives in one place, `TRAINER_ENV` / the `launch_env` fixture.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from slurm_cluster import REPO_ROOT, SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SLURM_DIR = REPO_ROOT / "slurm"

# What srun runs in these tests: the probe in place of mtpd_megatron.train / .looped / convert_to_hf.py.
TRAINER_ENV = {
    "MTPD_TRAIN_MODULE": "slurm_probe_trainer",
    "MTPD_LOOPED_MODULE": "slurm_probe_trainer",
    "MTPD_CONVERT_SCRIPT": str(TESTS / "slurm_probe_trainer.py"),
    "PYTHONPATH": str(TESTS),
}


@pytest.fixture
def launch_env(slurm_cluster: SlurmCluster, tmp_path: Path) -> dict[str, str]:
    env = slurm_cluster.env
    # Nothing from the calling shell may leak into the launch contract; MTPD_ROOT is found by the scripts.
    for key in ("MTPD_ROOT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MTPD_PYTHON"):
        env.pop(key, None)
    env.update(TRAINER_ENV)
    env["MTPD_LOG_DIR"] = str(tmp_path / "logs")
    return env


def write_config(path: Path, save: Path, train_iters: int, step_seconds: float = 0.5) -> Path:
    cfg = {"checkpoint": {"save": str(save)}, "training": {"train_iters": train_iters},
           "probe": {"step_seconds": step_seconds}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(save: Path, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((save / "probe").glob(f"{prefix}-*.json"))]


def tracker(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


def test_tasks_per_node_expansion():
    out = subprocess.run(
        ["bash", "-c", 'source "$1" && mtpd_expand_tasks_per_node "2(x3),1,4"', "x", str(SLURM_DIR / "common.sh")],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["2", "2", "2", "1", "4"]


def test_pretrain_two_nodes_four_ranks(slurm_cluster: SlurmCluster, launch_env, tmp_path: Path):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", save, train_iters=3, step_seconds=0.2)
    out = tmp_path / "job.out"
    # Submitted from outside the repo: the script must find the repo by itself.
    job = slurm_cluster.submit(
        ["-N", "2", "-n", "4", f"--output={out}", str(SLURM_DIR / "pretrain.sbatch"), str(cfg),
         "training.train_iters=4"],
        env=launch_env, cwd=tmp_path,
    )
    info = slurm_cluster.wait_for_job(job, timeout=90)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), slurm_cluster.diagnostics(job)

    recs = records(save, "train")
    assert sorted(r["rank"] for r in recs) == [0, 1, 2, 3], out.read_text()
    assert {r["world_size"] for r in recs} == {4}
    nodes = {r["slurmd_nodename"] for r in recs}
    assert nodes == {"n1", "n2"}, "ranks must span both nodes"
    by_rank = {r["rank"]: r for r in recs}
    assert by_rank[0]["slurmd_nodename"] == "n1"  # rank 0 on the first node, where MASTER_ADDR points
    for node in nodes:
        here = sorted(r["local_rank"] for r in recs if r["slurmd_nodename"] == node)
        assert here == [0, 1]
    assert {r["local_world_size"] for r in recs} == {"2"}
    assert {r["node_rank"] for r in recs} == {"0", "1"}
    # n1 does not resolve here (NodeHostname=localhost): the scripts fall back to Slurm's NodeAddr.
    assert {r["master_addr"] for r in recs} == {"127.0.0.1"}
    assert len({r["master_port"] for r in recs}) == 1
    assert {r["allreduce_sum"] for r in recs} == {1 + 2 + 3 + 4}
    assert {r["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] for r in recs} == {"1"}
    assert tracker(save) == 4  # the override on the sbatch command line reached the trainer


def test_preemption_requeues_and_resumes(slurm_cluster: SlurmCluster, launch_env, tmp_path: Path):
    save = tmp_path / "ckpt"
    iters = 24
    cfg = write_config(tmp_path / "cfg.yaml", save, train_iters=iters, step_seconds=0.5)
    out = tmp_path / "job.out"
    job = slurm_cluster.submit(
        ["-N", "2", "-n", "2", f"--output={out}", str(SLURM_DIR / "pretrain.sbatch"), str(cfg)],
        env=launch_env, cwd=tmp_path,
    )
    progress = save / "progress.txt"
    slurm_cluster.wait_until(
        lambda: progress.exists() and int(progress.read_text() or 0) >= 3, 60, "3 training steps"
    )
    # What `#SBATCH --signal=B:USR1@120` does near the time limit, at a moment of our choosing.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = slurm_cluster.wait_for_job(job, timeout=120)
    log = out.read_text()
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), slurm_cluster.diagnostics(job)
    assert info.restarts >= 1, log
    assert "forwarding SIGUSR1 to the step" in log and "requeueing job" in log, log

    first = records(save, "train-restart0")
    second = records(save, "train-restart1")
    assert {r["start_iteration"] for r in first} == {0}
    resumed = {r["start_iteration"] for r in second}
    assert len(resumed) == 1 and 3 <= resumed.pop() < iters, log  # resumed from the preemption checkpoint
    assert tracker(save) == iters
    assert "restart 0:" in log and "restart 1:" in log, "--open-mode=append keeps both runs' output"


def test_scancel_is_not_undone_by_a_requeue(slurm_cluster: SlurmCluster, launch_env, tmp_path: Path):
    # scancel SIGTERMs the tasks, which save and exit 75 like on preemption; the job must stay cancelled.
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", save, train_iters=200, step_seconds=0.5)
    out = tmp_path / "job.out"
    job = slurm_cluster.submit(
        ["-N", "2", "-n", "2", f"--output={out}", str(SLURM_DIR / "pretrain.sbatch"), str(cfg)],
        env=launch_env, cwd=tmp_path,
    )
    progress = save / "progress.txt"
    slurm_cluster.wait_until(lambda: progress.exists(), 60, "a training step")
    slurm_cluster.run(["scancel", job])
    slurm_cluster.wait_until(lambda: "step exited with" in out.read_text(), 30, "the step to end")
    slurm_cluster.wait_until(lambda: "not requeueing" in out.read_text(), 10, "the batch script's decision")
    info = slurm_cluster.wait_for_job(job, timeout=30)
    assert (info.state, info.restarts) == ("CANCELLED", 0), slurm_cluster.diagnostics(job)
    assert "saved iteration" in out.read_text(), "the trainer still checkpointed on SIGTERM"


def test_submit_chain_runs_stages_in_order_and_skips_complete(
    slurm_cluster: SlurmCluster, launch_env, tmp_path: Path
):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", save, train_iters=3, step_seconds=0.2)
    chain = [str(SLURM_DIR / "submit_chain.sh"), str(cfg)]

    def submit_chain(*args: str) -> tuple[dict[str, str], str]:
        proc = slurm_cluster.run([*chain, *args], env=launch_env, cwd=tmp_path)
        jobs = {}
        for line in proc.stdout.splitlines():
            words = line.split()
            if words[0] == "stage":
                jobs[words[1]] = words[3]
            elif words[0] == "convert":
                jobs["convert"] = words[2]
        return jobs, proc.stderr

    overrides = ["--", f"checkpoint.save={save}"]
    jobs, _ = submit_chain("--stages", "1,2", "-N", "2", "-n", "2", *overrides)
    assert list(jobs) == ["1", "2"]
    dependency = slurm_cluster.job_info(jobs["2"]).fields["Dependency"]
    assert dependency.startswith(f"afterok:{jobs['1']}"), dependency
    infos = {stage: slurm_cluster.wait_for_job(job, timeout=90) for stage, job in jobs.items()}
    for stage, info in infos.items():
        assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), slurm_cluster.diagnostics(jobs[stage])

    stage1_done = (save / "stage1" / "latest_checkpointed_iteration.txt").stat().st_mtime
    stage2 = records(save / "stage2", "stage2")
    assert len(stage2) == 2 and min(r["start_time"] for r in stage2) >= stage1_done, "stage 2 ran after stage 1"
    assert tracker(save / "stage1") == tracker(save / "stage2") == 3

    # Everything complete: a second run submits nothing.
    jobs, err = submit_chain("--stages", "1,2", "-N", "2", "-n", "2", *overrides)
    assert jobs == {}, err
    assert "nothing to submit" in err

    # One more stage plus conversion: only stage 4 runs (no dependency on finished jobs), then convert.
    out_dir = tmp_path / "hf"
    jobs, err = submit_chain(
        "--stages", "1,2,4", "--convert-to", str(out_dir), "--convert-from", str(save / "stage4"), "-n", "1",
        *overrides,
    )
    assert list(jobs) == ["4", "convert"], err
    assert slurm_cluster.job_info(jobs["4"]).fields["Dependency"] == "(null)"
    for job in jobs.values():
        info = slurm_cluster.wait_for_job(job, timeout=90)
        assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), slurm_cluster.diagnostics(job)
    assert json.loads((out_dir / "config.json").read_text())["iteration"] == 3
