"""The slurm/ launch scripts with the real trainer on a real (throwaway, two-node, one-machine) Slurm cluster.

Nothing is stubbed: `sbatch` runs slurm/pretrain.sbatch, slurm/looped_extension.sbatch (via
slurm/submit_chain.sh) and slurm/convert_hf.sbatch unmodified, and srun starts `python -m mtpd_megatron.train`
/ `python -m mtpd_megatron.looped` / tools/convert_to_hf.py on two emulated nodes (n1, n2: one slurmd each,
tests/slurm_cluster.py). Every job is world 2, one rank per node (TP1, DP2 over gloo), so the multi-node
launch path (MASTER_ADDR from the node list, RANK/NODE_RANK from Slurm) really runs. The model is the trainer
tests' tiny one (2 layers, hidden 64, 2 MTP heads, seq 32) on their synthetic corpus (tests/train_helpers.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import REPO_ROOT, JobInfo, SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)
from train_helpers import make_data, tiny_config, write_config

from mtpd_megatron.checkpoint import layout

pytestmark = pytest.mark.slow

SLURM_DIR = REPO_ROOT / "slurm"
PRETRAIN = str(SLURM_DIR / "pretrain.sbatch")
TWO_NODES = ["-N", "2", "-n", "2"]  # one rank per node: 1 CPU of each emulated node (this machine has 2)
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer.json, dataset prefix), built once for every job of this module."""
    return make_data(tmp_path_factory.mktemp("slurm_data"))


@pytest.fixture
def launch_env(slurm_cluster: SlurmCluster, tmp_path: Path) -> dict[str, str]:
    env = slurm_cluster.env
    # Nothing from the calling shell may leak into the launch contract; MTPD_ROOT is found by the scripts.
    for key in [k for k in env if k.startswith("MTPD_")] + [
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
    ]:
        env.pop(key, None)
    env["MTPD_PYTHON"] = sys.executable  # the venv that runs the tests (torch, megatron-core)
    env["MTPD_LOG_DIR"] = str(tmp_path / "logs")
    return env


def config(path: Path, data: tuple[Path, Path], save: Path, train_iters: int, **sections) -> Path:
    tok, prefix = data
    cfg = tiny_config(tok, prefix, save, **sections)
    cfg["training"].update(train_iters=train_iters, eval_interval=0)
    return write_config(path, cfg)


def submit_pretrain(cluster: SlurmCluster, env: dict, tmp_path: Path, cfg: Path, *overrides: str) -> tuple[str, Path]:
    out = tmp_path / "job.out"
    # Submitted from outside the repo: the script must find the repo by itself.
    job = cluster.submit([*TWO_NODES, f"--output={out}", PRETRAIN, str(cfg), *overrides], env=env, cwd=tmp_path)
    return job, out


def pretrain_running(
    cluster: SlurmCluster, env: dict, data, tmp_path: Path, save: Path, iters: int, steps: int
) -> tuple[str, Path]:
    """Submit the pretraining job on a fresh config and wait until its log shows `steps` training steps."""
    cfg = config(tmp_path / "cfg.yaml", data, save, train_iters=iters)
    job, out = submit_pretrain(cluster, env, tmp_path, cfg)
    cluster.wait_until(lambda: last_step(read(out), iters) >= steps, 120, f"{steps} training steps in the log")
    return job, out


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def last_step(log: str, train_iters: int) -> int:
    return max((int(s) for s in re.findall(rf"step (\d+)/{train_iters} ", log)), default=0)


def assert_final_checkpoint(save: Path, iteration: int, world_size: int = 2) -> dict:
    """`save` ends with a complete, published checkpoint at `iteration`, written by `world_size` ranks."""
    ckpt = save / layout.iter_dir_name(iteration)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    assert layout.verify(ckpt) is None, layout.verify(ckpt)
    meta = json.loads((ckpt / "mtpd_checkpoint.json").read_text())
    assert meta["iteration"] == iteration and meta["layout"]["world_size"] == world_size, meta
    assert len(list(ckpt.glob("*.distcp"))) == world_size, sorted(p.name for p in ckpt.iterdir())  # a shard per rank
    return meta


def assert_completed(cluster: SlurmCluster, info: JobInfo) -> None:
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), cluster.diagnostics(info.job_id, tail=80)


def test_tasks_per_node_expansion():
    out = subprocess.run(
        ["bash", "-c", 'source "$1" && mtpd_expand_tasks_per_node "2(x3),1,4"', "x", str(SLURM_DIR / "common.sh")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["2", "2", "2", "1", "4"]


def test_pretrain_two_nodes(slurm_cluster: SlurmCluster, launch_env, data, tmp_path: Path):
    save = tmp_path / "ckpt"
    cfg = config(tmp_path / "cfg.yaml", data, save, train_iters=40)
    env = {**launch_env, "MTPD_RANK_LOGS": "1"}  # one log per rank: shows where each rank ran
    job, out = submit_pretrain(slurm_cluster, env, tmp_path, cfg, "training.train_iters=20")
    info = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT)
    assert_completed(slurm_cluster, info)

    batch_log = read(out)
    assert "2 node(s) [n[1-2]], 2 task(s)" in batch_log, batch_log
    logs = {r: read(Path(env["MTPD_LOG_DIR"]) / f"mtpd-pretrain-{job}-rank{r}.log") for r in (0, 1)}
    port = 20000 + int(job) % 40000
    # Rank 0 on the first node, where MASTER_ADDR points (n1 does not resolve here: NodeHostname=localhost,
    # so the scripts fall back to Slurm's NodeAddr); rank 1 on the second node; one rendezvous for both.
    assert f"rank 0/2 on node n1 (node rank 0, local rank 0/1), master 127.0.0.1:{port}" in logs[0], logs[0]
    assert f"rank 1/2 on node n2 (node rank 1, local rank 0/1), master 127.0.0.1:{port}" in logs[1], logs[1]
    # The override on the sbatch command line reached the trainer (the config says 40).
    assert last_step(logs[0], 20) == 20, logs[0]
    assert f"[checkpoint] saved {save / layout.iter_dir_name(20)}" in logs[0], logs[0]
    assert_final_checkpoint(save, 20)


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, launch_env, data, tmp_path: Path):
    save, iters = tmp_path / "ckpt", 40
    job, out = pretrain_running(slurm_cluster, launch_env, data, tmp_path, save, iters, steps=3)
    # What `#SBATCH --signal=B:USR1@120` does near the time limit, at a moment of our choosing.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT)
    log = read(out)
    assert_completed(slurm_cluster, info)
    assert info.restarts >= 1, log

    # First run: the batch shell forwarded USR1, the trainer finished its step, saved, exited 75 -> requeue.
    first, _, second = log.partition("restart 1:")
    assert second, "--open-mode=append keeps both runs' output\n" + log
    assert "forwarding SIGUSR1 to the step" in first, first
    saved = re.search(r"saving at step (\d+); exiting with 75", first)
    assert saved, first
    at = int(saved.group(1))
    assert 3 <= at < iters, first
    assert f"[checkpoint] saved {save / layout.iter_dir_name(at)}" in first, first
    assert "step exited with 75 (after SIGUSR1)" in first and f"requeueing job {job}" in first, first

    # Second run: resumed from that checkpoint (not from 0) and trained to the end.
    resumed = re.search(r"\[checkpoint\] resumed from (\S+) at iteration (\d+)", second)
    assert resumed and int(resumed.group(2)) == at, second
    assert Path(resumed.group(1)) == save / layout.iter_dir_name(at), second
    assert f"step {at + 1}/{iters} " in second and f"step 1/{iters} " not in second, second
    assert "step exited with 0" in second, second
    assert_final_checkpoint(save, iters)


def test_scancel_saves_but_is_not_undone_by_a_requeue(slurm_cluster: SlurmCluster, launch_env, data, tmp_path: Path):
    # scancel SIGTERMs the ranks, which save and exit 75 like on preemption; the job must stay cancelled.
    save, iters = tmp_path / "ckpt", 1000
    job, out = pretrain_running(slurm_cluster, launch_env, data, tmp_path, save, iters, steps=2)
    slurm_cluster.run(["scancel", job])
    slurm_cluster.wait_until(lambda: "not requeueing" in read(out), 60, "the batch script's decision")
    info = slurm_cluster.wait_for_job(job, timeout=30)
    log = read(out)
    assert (info.state, info.restarts) == ("CANCELLED", 0), slurm_cluster.diagnostics(job)
    assert "step exited with 75 (after SIGTERM)" in log, log
    saved = re.search(r"saving at step (\d+); exiting with 75", log)
    assert saved, "the trainer still checkpoints on SIGTERM\n" + log
    assert_final_checkpoint(save, int(saved.group(1)))


def test_submit_chain_runs_looped_stages_in_order_and_skips_complete(
    slurm_cluster: SlurmCluster, launch_env, data, tmp_path: Path
):
    save = tmp_path / "ckpt"
    stage_iters = 6
    cfg = config(
        tmp_path / "looped.yaml",
        data,
        save,
        train_iters=stage_iters,
        looped={
            "stages": [
                {"heads": 1, "train_iters": stage_iters},
                {"heads": 2, "train_iters": stage_iters},
            ]
        },
    )
    stage_dirs = [save / "stage_0_heads_1", save / "stage_1_heads_2"]
    hf = tmp_path / "hf"
    args = [
        str(SLURM_DIR / "submit_chain.sh"),
        str(cfg),
        *TWO_NODES,
        "--convert-to",
        str(hf),
        "--convert-from",
        str(stage_dirs[1]),
    ]

    def submit_chain() -> tuple[dict[str, str], str]:
        proc = slurm_cluster.run(args, env=launch_env, cwd=tmp_path)
        jobs = {}
        for line in proc.stdout.splitlines():
            words = line.split()
            if words[0] == "stage":
                jobs[words[1]] = words[3]
            elif words[0] == "convert":
                jobs["convert"] = words[2]
        return jobs, proc.stderr

    # No --stages: every stage of looped.stages (0, 1), then the conversion of the last one.
    jobs, err = submit_chain()
    assert list(jobs) == ["0", "1", "convert"], err
    for before, after in (("0", "1"), ("1", "convert")):
        dependency = slurm_cluster.job_info(jobs[after]).fields["Dependency"]
        assert dependency.startswith(f"afterok:{jobs[before]}"), dependency

    infos = {}
    for name, job in jobs.items():  # in chain order: a failed stage shows its own log, not a cancelled child
        infos[name] = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT)
        assert_completed(slurm_cluster, infos[name])
    for before, after in (("0", "1"), ("1", "convert")):
        assert infos[after].fields["StartTime"] >= infos[before].fields["EndTime"], (infos[before], infos[after])

    for heads, stage_dir in enumerate(stage_dirs, start=1):
        meta = assert_final_checkpoint(stage_dir, stage_iters)
        assert meta["config"]["mtp"]["num_heads"] == heads, meta["config"]["mtp"]
    assert (hf / "config.json").exists(), sorted(p.name for p in hf.iterdir()) if hf.exists() else "no HF dir"

    # Everything complete: a second run submits nothing (no stage, and the conversion exists).
    jobs, err = submit_chain()
    assert jobs == {}, err
    assert "nothing to submit" in err, err
