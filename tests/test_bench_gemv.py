"""tools/bench_gemv.py on a machine without a GPU: usage and config errors are one line, exit 2, no file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "configs/tiny_dense.yaml"], "model.vocab_size is null"),
        (["--config", "configs/dense_2b.yaml", "--rows", "0"], "--rows 0"),
        (["--config", "configs/dense_2b.yaml", "--only", "linear_qvk"], "--only linear_qvk"),
        (["--config", "configs/dense_2b.yaml", "--draft-vocab", "0"], "--draft-vocab 0: each size must be >= 1"),
        (["--config", "configs/dense_2b.yaml", "--vocab-size", "0"], "--vocab-size 0: must be >= 1"),
        (["--config", "configs/nope.yaml"], "nope.yaml"),
        (["--config", "configs/dense_2b.yaml"], "needs a CUDA device"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "gemv.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_gemv.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
