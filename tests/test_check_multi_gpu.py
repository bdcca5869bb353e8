"""tools/check_multi_gpu.py (issue 19) on CPU: its own run of the real trainer under torchrun with 2 gloo ranks.

The tool is meant for 2-4 GPUs on NCCL; here it runs the same code path on CPU (fp32, tolerance 1e-4) on the
tiny dense model: the TP1 reference, TP2+SP, PP2 and DP2 resumed from the reference's checkpoint, and the
TP2 checkpoint resharded onto one process, each compared step by step with the reference's metrics.jsonl.
`compare` is also checked on a perturbed record, so a tool that passed everything could not pass here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_multi_gpu.py"


def _tool(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_layouts_and_reshard_agree_on_gloo(tmp_path):
    tok, prefix = make_data(tmp_path / "data")
    out = tmp_path / "check"
    r = _tool(
        "--config", "configs/tiny_dense.yaml", "--gpus", "2", "--device", "cpu",
        "--steps", "4", "--resume-at", "2", "--extra", "1", "--out", str(out),
        f"data.tokenizer={tok}", f"data.paths=[{prefix}]", "data.split=90,10,0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    result = json.loads((out / "check.json").read_text())
    names = [run["name"] for run in result["runs"]]
    assert names == ["tp2_sp", "pp2", "dp2", "reshard_tp2_sp_to_1"]
    for run in result["runs"]:
        assert run["ok"], run
        assert run["worst"]["loss"] < 1e-4 and any(k.startswith("mtp1/") for k in run["worst"])
    assert result["scaling"]["tokens_per_s_per_gpu_1"] > 0 and result["scaling"]["tokens_per_s_per_gpu_2"] > 0
    assert "reshard_tp2_sp_to_1 | yes" in (out / "check.md").read_text()
    for name in names:  # each run resumed a checkpoint written by another layout
        assert "resumed from" in (out / name / "stdout.txt").read_text(), name


def test_compare_flags_a_perturbed_step():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from check_multi_gpu import TOLERANCE, compare
    finally:
        sys.path.remove(str(ROOT / "tools"))
    ref = {3: {"loss": 5.0, "grad_norm": 1.0, "mtp1/ce": 6.0, "mtp1/accept": 0.2}}
    same = compare("same", {3: dict(ref[3])}, ref, range(3, 4), TOLERANCE["cpu"])
    assert same["ok"] and same["worst"]["loss"] == 0
    off = compare("off", {3: {**ref[3], "mtp1/accept": 0.3}}, ref, range(3, 4), TOLERANCE["cpu"])
    assert not off["ok"] and "mtp1/accept" in off["failures"][0]
    missing = compare("missing", {}, ref, range(3, 4), TOLERANCE["cpu"])
    assert not missing["ok"] and "missing" in missing["failures"][0]


def test_a_layout_the_config_cannot_take_is_skipped_with_the_validators_reason():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from check_multi_gpu import _invalid, _parallel, layouts, parse_args
    finally:
        sys.path.remove(str(ROOT / "tools"))
    args = parse_args(["--config", "configs/tiny_moe.yaml", "--gpus", "4", "--out", "/nonexistent/x"])
    names = list(layouts(4, moe=True))
    assert names == ["ep4", "tp4_sp", "pp2", "dp4", "tp2_ep2_sp"]
    reasons = {n: _invalid(args, _parallel(4, **p), 4) for n, p in layouts(4, moe=True).items()}
    assert "num_query_groups=2" in reasons["tp4_sp"] and "tensor_model_parallel_size=4" in reasons["tp4_sp"]
    assert all(reasons[n] is None for n in ("ep4", "pp2", "dp4", "tp2_ep2_sp"))


def test_usage_errors_are_one_line(tmp_path):
    for args, needle in (
        (["--gpus", "3"], "--gpus 3"),
        (["--gpus", "2", "--steps", "4", "--resume-at", "4"], "--resume-at 4"),
    ):
        r = _tool("--config", "configs/tiny_dense.yaml", "--out", "/nonexistent/x", *args, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr

    out = tmp_path / "check"  # a config the reference cannot run: the validator's line, nothing written
    r = _tool("--config", "configs/tiny_dense.yaml", "--gpus", "2", "--out", str(out), "training.global_batch_size=3")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "training.global_batch_size=3" in lines[0], r.stderr
    assert not out.exists()  # nothing written
