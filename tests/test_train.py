"""The training run as a user sees it: the loss falls, log lines carry per-head acceptance, TensorBoard and
metrics.jsonl are written, bad configs and diverging runs stop with their documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import make_data, read_metrics, run, tiny_config, write_config

from mtpd_megatron.parallel.launch import read_env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_data(tmp_path_factory.mktemp("train-data"))


@pytest.mark.slow
def test_short_run_learns_and_logs(data, tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data,
            save,
            training={"train_iters": 30, "eval_interval": 15, "eval_iters": 2},
            logging={"log_interval": 5, "progress_bar": "off"},
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)])
    assert rc == 0, err
    assert err.strip() == ""  # start-up noise is silenced; nothing else to say

    train = read_metrics(save / "tensorboard")
    assert sorted(train) == [5, 10, 15, 20, 25, 30]
    assert train[30]["loss"] < train[5]["loss"] - 0.4, train  # the Markov corpus is learnable fast
    assert train[30]["mtp1/ce"] < train[5]["mtp1/ce"]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops", "mtp1/accept", "mtp2/accept", "mtp1/kl", "tau"):
        assert key in train[30], key
    assert train[30]["mfu"] is None  # CPU: no peak to divide by

    lines = [line for line in out.splitlines() if "] step " in line]
    assert len(lines) == 6 and all("mtp1 ce" in line and "acc" in line and "tau" in line for line in lines)
    assert "MFU n/a" in lines[0]
    evals = read_metrics(save / "tensorboard", kind="eval")
    assert sorted(evals) == [15, 30] and 0 <= evals[30]["mtp2/accept"] <= 1
    assert "validation at step 30" in out
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert (save / "iter_0000030" / "mtpd_checkpoint.json").is_file()
    meta = json.loads((save / "iter_0000030" / "mtpd_checkpoint.json").read_text())
    assert meta["vocab_size"] == 512 and meta["stage"] == "pretrain" and meta["config"]["mtp"]["num_heads"] == 2


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_with_exit_3(data, tmp_path):
    # lr=1e30: step 1 is finite and throws the weights to ~1e30; every later step overflows. Those updates
    # are skipped (the weights stay as they are), so the run stops after max_consecutive_nan_steps.
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(
            *data, save, training={"lr": 1e30, "min_lr": 0.0, "lr_warmup_iters": 0, "max_consecutive_nan_steps": 3}
        ),
    )
    [(rc, out, err)] = run(["--config", str(cfg)])
    assert rc == 3, err
    assert err.strip().splitlines() == [
        line for line in err.strip().splitlines() if line.startswith("mtpd-train: error: ")
    ]
    assert "training.max_consecutive_nan_steps" in err
    assert [r["skipped_steps"] for _, r in sorted(read_metrics(save / "tensorboard").items())] == [0, 1, 2, 3]
    assert not list(save.glob("iter_*"))  # nothing saved from a diverged run


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["training.train_iterz=5"], "did you mean 'train_iters'"),
        (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
        (["data.tokenizer=null"], "data.tokenizer"),
    ],
)
def test_config_errors_exit_2_before_anything_starts(data, tmp_path, capsys, overrides, needle):
    from mtpd_megatron.train import main  # in-process: these errors come before any process group

    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(*data, save))
    rc = main(["--config", str(cfg), *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(lines)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mtpd-train: error: ") and needle in lines[0], err
    assert not save.exists()


def test_launch_env_from_torchrun_or_slurm():
    torchrun = read_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "123",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, "torchrun")
    slurm = read_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42", "MASTER_ADDR": "node7"}
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.master_port) == (
        5,
        16,
        1,
        "node7",
        20042,
    )
    single = read_env({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")
