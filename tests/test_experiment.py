"""The experiment harness end to end on CPU: tiny arms trained by the real trainer (two at once), evaluated
with the project's tools, reported; its table rebuilt from the arm files; bad experiment files refused in
one line with exit 2 before anything is written."""

from __future__ import annotations

import json
import subprocess

import pytest
import train_helpers as th
import yaml

TOOL = [th.PYTHON, "tools/run_experiment.py"]


def _run(*args):
    return subprocess.run([*TOOL, *map(str, args)], cwd=th.ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    tok, prefix = th.make_data(root / "data")
    cfg = th.tiny_config(tok, prefix, None)
    cfg["data"]["split"] = "80,20,0"
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def _experiment(root, base_path, arms, name="tiny", **extra):
    spec = {
        "name": name,
        "base": str(base_path),
        "overrides": {"training.train_iters": 12, "training.eval_interval": 12, "logging.log_interval": 4},
        "evaluation": {
            "num_samples": 8,
            "batch_size": 4,
            "gradient_batches": 1,
            "decode": {"when": "always", "k": [1, 2], "num_prompts": 1, "prompt_len": 8, "new_tokens": 6},
        },
        "arms": arms,
        **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_two_arms_end_to_end_and_report_rebuild(base):
    root, base_path = base
    exp = _experiment(
        root,
        base_path,
        {
            "no_mtp": {"overrides": {"mtp.num_heads": 0, "mtp.mtpd.enabled": False}, "note": "reference"},
            "mtpd": {"overrides": {"mtp.loss_scaling_factor": 1.0}, "note": "MTP-D"},
        },
    )
    out = root / "out"
    proc = _run(exp, "--out", out, "--parallel", 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no_mtp: trained in" in proc.stdout and "mtpd: trained in" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    assert summary["reference"] == "no_mtp" and [r["arm"] for r in summary["arms"]] == ["no_mtp", "mtpd"]
    none, mtpd = summary["arms"]
    assert none["num_heads"] == 0 and none["a"] is None and none["decode"] is None
    assert mtpd["num_heads"] == 2 and len(mtpd["a"]) == 2 and mtpd["tau"] == pytest.approx(1 + sum(mtpd["car"]))
    assert 0 < none["main_loss"] < 10 and 0 < mtpd["main_loss"] < 10
    # the two arms were scored on the same held-out tokens; decoding ran K = 1, 2 against greedy
    assert none["evaluation"]["trained"]["loss_tokens"] == mtpd["evaluation"]["trained"]["loss_tokens"]
    assert [r["k"] for r in mtpd["decode"]["speculative"]] == [1, 2]
    assert all(r["identical_to_greedy"] for r in mtpd["decode"]["speculative"])  # fp32 on CPU: exact
    grads = mtpd["gradients"]["last_layer"]
    assert grads["main_ce_norm"] > 0 and grads["head_ce_norm"] > 0 and grads["head_kl_norm"] > 0
    assert -1 <= grads["cos_main_ce_head_kl"] <= 1
    table = (out / "results.md").read_text()
    assert "| no_mtp | " in table and "| mtpd | " in table and "+0.00%" in table
    for png in ("acceptance.png", "loss_vs_tau.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Resumable: a second run trains and evaluates nothing; the report is rebuilt from the arm files alone.
    again = _run(exp, "--out", out)
    assert again.returncode == 0 and "trained already" in again.stdout and "evaluated already" in again.stdout
    (out / "results.md").unlink()
    rebuilt = _run(exp, "--out", out, "--report-only")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (out / "results.md").read_text() == table

    # A later session imports the finished arms of a committed results.json instead of rerunning them.
    fresh = root / "fresh"
    imported = _run(exp, "--out", fresh, "--import", out / "results.json", "--report-only")
    assert imported.returncode == 0 and "imported 2 finished arms" in imported.stdout
    assert (fresh / "results.md").read_text().split("\n", 3)[3] == table.split("\n", 3)[3]
    # Arms from another session's commit: the header names each commit with its arms, not the first arm's alone.
    summary = json.loads((out / "results.json").read_text())
    summary["arms"][1]["commit"] = "0123abc"
    (root / "mixed.json").write_text(json.dumps(summary))
    mixed = _run(exp, "--out", root / "mixed", "--import", root / "mixed.json", "--report-only")
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    header = (root / "mixed" / "results.md").read_text().split("\n")[2]
    first, second = (a["arm"] for a in summary["arms"])
    assert f"commit {summary['arms'][0]['commit']} ({first}); 0123abc ({second})," in header, header


@pytest.mark.parametrize(
    "arms,extra,expected",
    [
        ({"a": {"overides": {"mtp.num_heads": 0}}}, {}, "arms.a.overides: unknown key (did you mean 'overrides'?)"),
        (
            {"a": {"overrides": {"mtp.num_hedas": 0}}},
            {},
            "arms.a: mtp.num_hedas: unknown key (did you mean 'num_heads'?)",
        ),
        ({"a": {}, "b": {"overrides": {"training.train_iters": 13}}}, {}, "arms.b: trains"),
        ({"a": {}, "b": {"overrides": {"training.seed": 7}}}, {}, "arms.b: training.seed=7"),
        ({"a": {}}, {"base": "configs/nope.yaml"}, "base: 'configs/nope.yaml' not found"),
        ({"a": {}, "x": {"extend": {"parent": "zz", "heads": 4}}}, {}, "arms.x.extend.parent: 'zz'"),
        ({"a": {"overrides": {"mtp.mtpd.lk_lambda": 2.0}}}, {}, "arms.a: mtp.mtpd.lk_lambda=2.0: must be in [0, 1]"),
        ({"a": {}}, {"reference": "b"}, "reference: 'b' is not an arm"),
    ],
)
def test_bad_experiment_files_are_refused_before_anything_is_written(base, arms, extra, expected):
    root, base_path = base
    exp = _experiment(root, base_path, arms, name="bad")
    if extra:
        spec = yaml.safe_load(exp.read_text())
        spec.update(extra)
        exp.write_text(yaml.safe_dump(spec))
    out = root / "bad_out"
    proc = _run(exp, "--out", out)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("run_experiment: error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists()
