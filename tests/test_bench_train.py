"""tools/bench_train.py end to end on CPU: the real trainer for 2 timed steps of the tiny presets.

Checks the JSON it writes (every run's fields, the baselines in the same run), the profile table, the
grouped-experts numerics check, and that each --compare switch leaves the training losses unchanged
(same seed, same synthetic data: on and off must agree; fp32 on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("step_ms", "tokens_per_s", "tflops", "mfu", "peak_gib", "flops_per_token", "losses")


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_train.py"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--warmup",
            "0",
            "--device",
            "cpu",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    return json.loads((out / "bench.json").read_text()) | {"_out": str(out), "_stdout": proc.stdout}


def _by_name(result: dict) -> dict:
    return {r["name"]: r for r in result["runs"]}


def _same_losses(runs: dict, switch: str, atol: float) -> None:
    off, on = runs[f"mtpd+{switch}=off"]["losses"], runs[f"mtpd+{switch}=on"]["losses"]
    assert len(off) == len(on) == 2
    assert on == pytest.approx(off, abs=atol), switch
    heads_off, heads_on = runs[f"mtpd+{switch}=off"]["heads"], runs[f"mtpd+{switch}=on"]["heads"]
    assert heads_off and set(heads_on) == set(heads_off)
    for key, value in heads_off.items():
        assert heads_on[key] == pytest.approx(value, abs=1e-4), (switch, key)


def test_dense_arms_profile_and_head_switches(tmp_path):
    result = _bench(
        tmp_path,
        "--config",
        "configs/tiny_dense.yaml",
        "--profile",
        "mtpd",
        "--compare",
        "fused_output_layer,fused_adam,foreach_multi_tensor",
        "training.global_batch_size=4",
    )
    runs = _by_name(result)
    assert list(runs)[:3] == ["nomtp", "mtp", "mtpd"]
    for run in runs.values():
        for field in FIELDS:
            assert field in run
        assert run["step_ms"] > 0 and run["tokens_per_s"] > 0 and run["tflops"] > 0
        assert run["mfu"] is None and run["peak_gib"] is None  # CPU: no peak, no CUDA allocator
        assert "step_time_vs_nomtp" in run
    assert runs["nomtp"]["mtp_heads"] == 0 and not runs["nomtp"]["mtpd"]
    assert runs["mtp"]["mtp_heads"] > 0 and not runs["mtp"]["mtpd"] and runs["mtpd"]["mtpd"]
    # the heads' and the teacher's FLOPs are counted
    assert runs["nomtp"]["flops_per_token"] < runs["mtp"]["flops_per_token"] < runs["mtpd"]["flops_per_token"]
    assert runs["mtp"]["losses"][0] == pytest.approx(runs["mtpd"]["losses"][0], abs=1e-6)  # same model, same batch
    _same_losses(runs, "fused_output_layer", 1e-5)  # share_teacher_logits: tests/test_fused_head.py
    _same_losses(runs, "fused_adam", 1e-5)
    _same_losses(runs, "foreach_multi_tensor", 1e-5)  # the kernels themselves: tests/test_optim_foreach.py
    assert runs["mtpd+fused_adam=off"]["same_run_as"] == "mtpd"  # off is the default: not run twice
    assert "same_run_as" not in runs["mtpd+fused_adam=on"]
    profile = Path(runs["mtpd"]["profile"])
    assert profile.is_file() and "Self CPU" in profile.read_text()
    assert result["data"].startswith("synthetic")


def test_moe_layers_override_and_grouped_gemm_switch(tmp_path):
    result = _bench(
        tmp_path,
        "--config",
        "configs/tiny_moe.yaml",
        "--layers",
        "2",
        "--arms",
        "nomtp,mtpd",  # no heads first: megatron's MoE metrics tracker must not keep the 2-layer size
        "--compare",
        "grouped_gemm",
        "training.global_batch_size=4",
    )
    runs = _by_name(result)
    assert set(runs) == {"nomtp", "mtpd", "mtpd+grouped_gemm=off", "mtpd+grouped_gemm=on"}
    _same_losses(runs, "grouped_gemm", 1e-5)
    check = runs["mtpd+grouped_gemm=on"]["grouped_check"]
    assert check is not None and not check["grouped_mm"]  # CPU: the loop fallback
    assert check["max_abs_diff"] <= 1e-6 * max(1.0, check["max_abs_ref"])
    assert runs["mtpd+grouped_gemm=off"]["grouped_check"] is None  # SequentialMLP: nothing to check
    assert runs["mtpd+grouped_gemm=on"]["same_run_as"] == "mtpd"  # auto = grouped without TE
    assert result["layers"] == 2


_TWO_TRAINERS = r"""
import gc, sys, weakref
from pathlib import Path

sys.path.insert(0, "tools")
import bench_train as bt
from mtpd_megatron.data import load_tokenizer
from mtpd_megatron.model.grouped_experts import GroupedGemmExperts
from mtpd_megatron.parallel import launch
from mtpd_megatron.trainer import Trainer

out = Path(sys.argv[1])
args, _ = bt.parse_args(["--config", "configs/tiny_moe.yaml", "--device", "cpu", "--out", str(out), "--steps", "1",
                         "--warmup", "0", "training.global_batch_size=4"])
probe = bt.base_config(args, out / "tok" / "tokenizer.json", out / "synthetic_text_document", [])
device = launch.init_distributed(probe, launch.read_env())
tok_path, prefix = bt.write_synthetic_data(out, probe.model.vocab_size, 20000, 0)
tokenizer = load_tokenizer(tok_path)


def run(arm):  # as bench_train's run_one: a step, then close, drop, collect
    trainer = Trainer(bt.base_config(args, tok_path, prefix, bt.ARM_OVERRIDES[arm]), tokenizer, device, resume="none")
    trainer.train_step()
    experts = next(m for m in trainer.model[0].modules() if isinstance(m, GroupedGemmExperts))
    refs = {"model": weakref.ref(trainer.model[0]), "expert weight": weakref.ref(next(experts.parameters())),
            "optimizer": weakref.ref(trainer.optimizer)}
    trainer.close()
    del trainer, experts
    # two passes: fp32 (CPU) optimizer shards are views of the parameters, so the model goes after them
    gc.collect()
    gc.collect()
    return [name for name, ref in refs.items() if ref() is not None]


for arm in ("mtpd", "mtp"):
    alive = run(arm)
    print(arm, "alive after close:", alive, flush=True)
    assert not alive, (arm, alive)
launch.shutdown()
print("released")
"""


def test_moe_trainer_is_freed_after_close(tmp_path):
    """Two MoE trainers with MTP heads in one process (bench_train's arms): each one's model, experts and
    optimizer are garbage-collected after close. The MoE token dispatchers' routing probabilities (graph
    attached) kept the whole model alive through DDP's hooks (Trainer._release_model): on the H200 the
    second trainer ran out of memory."""
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_TRAINERS, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "released" in proc.stdout


def test_bad_flags_are_one_line_errors(tmp_path):
    for args, needle in (
        (["--config", "configs/tiny_dense.yaml", "--compare", "warp_drive"], "--compare"),
        (["--config", "configs/tiny_dense.yaml", "--arms", "mtp,xyz"], "--arms"),
        (["--config", "configs/nope.yaml"], "--config"),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--out", str(tmp_path / "x"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 2
        assert f"bench_train.py: error: {needle}" in proc.stderr
        assert not (tmp_path / "x").exists()
