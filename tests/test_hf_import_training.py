"""Training starts from a Hugging Face model: train -> export -> import (convert_from_hf) -> train again.

The imported checkpoint holds weights only (stage "hf_import"); the trainer loads them into a fresh run
(iteration 0, new optimizer and schedule) instead of refusing the missing optimizer state.
"""

import subprocess

from tests import train_helpers as th


def test_training_starts_from_an_imported_hf_model(tmp_path):
    tok, prefix = th.make_data(tmp_path / "data")
    first = th.write_config(
        tmp_path / "first.yaml",
        th.tiny_config(
            tok,
            prefix,
            tmp_path / "first",
            training={"train_iters": 12},
            logging={"tensorboard_dir": str(tmp_path / "tb1"), "log_interval": 1},
        ),
    )
    [(rc, out, err)] = th.run(["--config", str(first)])
    assert rc == 0, out[-2000:] + err[-2000:]

    hf, imported = tmp_path / "hf", tmp_path / "imported"
    for cmd in (
        ["tools/convert_to_hf.py", "--ckpt", str(tmp_path / "first"), "--out", str(hf)],
        ["tools/convert_from_hf.py", "--hf", str(hf), "--out", str(imported), "--config", str(first)],
    ):
        done = subprocess.run([th.PYTHON, *cmd], cwd=th.ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    second = th.write_config(
        tmp_path / "second.yaml",
        th.tiny_config(
            tok,
            prefix,
            tmp_path / "second",
            training={"train_iters": 2},
            logging={"tensorboard_dir": str(tmp_path / "tb2"), "log_interval": 1},
        ),
    )
    [(rc, out, err)] = th.run(["--config", str(second), "--resume", str(imported)])
    assert rc == 0, out[-2000:] + err[-2000:]
    assert "initialised the weights from" in out
    fresh, started = th.read_metrics(tmp_path / "tb1"), th.read_metrics(tmp_path / "tb2")
    assert sorted(started) == [1, 2], "an imported model starts a new run at iteration 0"
    # Same data order from step 1: the imported weights are the trained ones, so the loss starts far lower.
    assert started[1]["loss"] < fresh[1]["loss"] - 0.3, (started[1]["loss"], fresh[1]["loss"])
    assert abs(started[1]["loss"] - fresh[12]["loss"]) < 0.5
