"""Every row of README's "Using it" table runs as written: each command with tiny settings (the fixture's data
and a few steps), or `--help` where it needs a cluster, a GPU or a large download.

The table is parsed from README.md, and each row must still mention what is run here: a row that changes
without this test changing with it fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import train_helpers as th

ROOT = th.ROOT
VENV_BIN = os.path.dirname(sys.executable)


def readme_rows() -> dict:
    """task -> command cell of README's "Using it" table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Using it", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and cells[0] not in ("task", "---"):
            rows[cells[0]] = cells[1]
    return rows


# What each row must say (the commands below run exactly these, with tiny arguments for the placeholders).
MENTIONS = {
    "pretrain": ["python -m mtpd_megatron.train --nproc-per-node N --config configs/tiny_dense.yaml"],
    "check a config": ["python -m mtpd_megatron.config configs/moe_a1b.yaml --world-size 64"],
    "data": [
        "tools/fetch_corpus.py",
        "tools/train_tokenizer.py",
        "tools/preprocess_data.py",
        "tools/prepare_experiment_data.sh DIR",
    ],
    "looped extension 1→2→4→8→16": ["python -m mtpd_megatron.looped run-chain --config CFG", "status"],
    "Slurm": ["sbatch -N 8 slurm/pretrain.sbatch CFG", "slurm/submit_chain.sh CFG --convert-to OUT"],
    "acceptance (beside main-head loss)": ["tools/eval_acceptance.py --ckpt A --ckpt B --out r.json --plot r.png"],
    "experiments (arms at equal tokens)": ["tools/run_experiment.py configs/experiments/seesaw_gpu_small.yaml"],
    "post-training that keeps the heads": [
        "tools/finetune_hf.py --model HF --out FT --heads mtpd --zero-stage 3",
        "tools/run_posttrain_experiment.py --export HF --out DIR",
    ],
    "training throughput": ["tools/bench_train.py --config configs/dense_2b.yaml --out DIR"],
    "speculative decoding": ['tools/speculative_decode.py --ckpt DIR --prompt "..." --k 4', "tools/bench_decode.py"],
    "Hugging Face": [
        "tools/convert_to_hf.py --ckpt DIR --out HF",
        "tools/convert_from_hf.py --hf HF --out CKPT --tp 2",
        "tools/attach_mtp_heads.py --model FT --heads HF",
    ],
}


def run(*cmd, ok=(0,), timeout=600):
    """A README command from the checkout with the environment activated (the venv's bin first on PATH)."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode in ok, (
        f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_every_row_is_covered():
    rows = readme_rows()
    assert set(rows) == set(MENTIONS), f"README rows changed: {sorted(rows)}"
    for task, fragments in MENTIONS.items():
        for fragment in fragments:
            assert fragment in rows[task].replace("\\|", "|"), (task, fragment)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The pretrain row as written (one rank, a few steps on the fixture's data): its checkpoint."""
    root = tmp_path_factory.mktemp("readme")
    tok, prefix = th.make_data(root / "data")
    ckpt = root / "ckpt"
    run(
        "python",
        "-m",
        "mtpd_megatron.train",
        "--nproc-per-node",
        1,
        "--config",
        "configs/tiny_dense.yaml",
        f"data.tokenizer={tok}",
        f"data.paths=[{prefix}]",
        "data.split=80,10,10",
        "training.train_iters=3",
        "training.lr_warmup_iters=1",
        "training.eval_interval=0",
        f"checkpoint.save={ckpt}",
        "training.device=cpu",
        "logging.progress_bar=off",
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    return root, ckpt


def test_check_a_config():
    out = run("python", "-m", "mtpd_megatron.config", "configs/moe_a1b.yaml", "--world-size", 64).stdout
    assert "# layout: world 64" in out


def test_data_tools_help():
    for tool in (
        "tools/fetch_corpus.py",
        "tools/train_tokenizer.py",
        "tools/preprocess_data.py",
        "tools/prepare_experiment_data.sh",
    ):
        out = run(tool, "--help")
        assert out.stdout.strip() and not out.stderr.strip(), (tool, out.stderr)


def test_looped_rows(tmp_path):
    out = run(
        "python",
        "-m",
        "mtpd_megatron.looped",
        "status",
        "--config",
        "configs/tiny_dense.yaml",
        f"looped.root={tmp_path}",
        ok=(1,),
    ).stdout
    assert out.count("not complete") == 3
    assert "run-chain" in run("python", "-m", "mtpd_megatron.looped", "--help").stdout


def test_slurm_rows(tmp_path):
    for script in ("slurm/pretrain.sbatch", "slurm/submit_chain.sh"):
        assert os.access(ROOT / script, os.X_OK), script
    out = run(
        "slurm/submit_chain.sh",
        "configs/tiny_dense.yaml",
        "--convert-to",
        tmp_path / "hf",
        "--dry-run",
        "--",
        f"looped.root={tmp_path}",
    )
    assert out.stdout.count("stage ") == 3 and "convert job" in out.stdout
    assert f"--ckpt {tmp_path}/stage_2_heads_4" in out.stderr  # the last stage is converted by default


def test_acceptance_speculative_decoding_and_hugging_face_rows(trained):
    root, ckpt = trained
    run(
        "tools/eval_acceptance.py",
        "--ckpt",
        ckpt,
        "--ckpt",
        ckpt,
        "--split",
        "valid",
        "--num-samples",
        4,
        "--out",
        root / "r.json",
        "--plot",
        root / "r.png",
    )
    result = json.loads((root / "r.json").read_text())
    assert len(result["checkpoints"]) == 2 and "main_loss" in result["checkpoints"][0]
    spec = run(
        "tools/speculative_decode.py", "--ckpt", ckpt, "--prompt", "some text to continue", "--k", 4, "--new-tokens", 8
    )
    assert "identical to greedy: True" in spec.stdout
    assert "--k" in run("tools/bench_decode.py", "--help").stdout
    run("tools/convert_to_hf.py", "--ckpt", ckpt, "--out", root / "hf")
    run("tools/convert_from_hf.py", "--hf", root / "hf", "--out", root / "back", "--tp", 2)
    assert (root / "back" / "latest_checkpointed_iteration.txt").is_file()
    assert "--heads" in run("tools/attach_mtp_heads.py", "--help").stdout


def test_post_training_and_throughput_rows():
    """--help here: tests/test_finetune_hf.py runs both post-training tools under DeepSpeed on CPU, and
    tests/test_bench_train.py runs the throughput bench on the tiny presets."""
    for tool, flag in (
        ("tools/finetune_hf.py", "--zero-stage"),
        ("tools/run_posttrain_experiment.py", "--export"),
        ("tools/bench_train.py", "--compare"),
    ):
        out = run(tool, "--help")
        assert flag in out.stdout and not out.stderr.strip(), (tool, out.stderr)


def test_experiments_row(tmp_path):
    """The shipped experiment file loads and the committed results rebuild its report (arms run on a GPU)."""
    out = run(
        "tools/run_experiment.py",
        "configs/experiments/seesaw_gpu_small.yaml",
        "--out",
        tmp_path,
        "--import",
        "docs/results/seesaw_gpu_small/results.json",
        "--report-only",
    )
    assert "imported 19 finished arms" in out.stdout and (tmp_path / "results.md").is_file()


def test_main_job_end_to_end(tmp_path):
    """README's first command, `bash tools/demo.sh` (tools/demo.py in the venv), with a smaller vocabulary and a few
    steps: every stage runs, the decode stage fits the model's context, and the summary is printed."""
    out = run(sys.executable, "tools/demo.py", "--out", tmp_path, "--steps", 8, "--vocab-size", 512, timeout=900).stdout
    for stage in ("corpus", "tokenizer", "preprocess", "pretrain", "acceptance", "export", "decode", "summary"):
        assert f"[demo] {stage}: " in out, (stage, out[-3000:])
    decode = json.loads((tmp_path / "eval" / "decode.json").read_text())
    k4 = next(r for r in decode["speculative"] if r["k"] == 4)
    assert k4["matching_prompts"] == decode["prompts"] == 4
    assert "What this shows:" in out and "[demo] finished in" in out
