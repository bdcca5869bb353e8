"""Post-training with the heads (mtpd_megatron/posttrain, tools/finetune_hf.py, tools/run_posttrain_experiment.py).

A tiny export (2 layers, h 64, 2 MTP heads in the sidecar, written by the real megatron -> HF converter) is fine-tuned
on CPython standard library sources with real DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo): the experiment tool runs
heads frozen and MTP-D under ZeRO-3, tools/finetune_hf.py runs MTP-D under ZeRO-2 with the same settings. Checked:
both exports reload with their heads and draft (generate(use_mtp=True) = greedy), ZeRO-3's gathered weights equal
ZeRO-2's, frozen heads are bitwise the source's while trained ones moved, the experiment's JSON / table / plot;
the loss equals the float64 reference of mtpd/reference.py on the same logits; bad flags and configs are one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from distributed_harness import run_distributed

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# small and stable parts of the standard library: the training text and held-out documents of the tests
DOMAIN = [str(STDLIB / "json")]
TINY = [
    "data.seq_length=32",
    "data.valid_sequences=4",
    "data.valid_fraction=0.2",
    "data.max_train_tokens=4000",
    "training.micro_batch_size=2",
    "training.log_interval=2",
    "training.lr=3e-3",
    "training.min_lr=3e-4",
    "training.lr_warmup_iters=1",
    "training.eval_batch_size=4",
    "mtp.mtpd.topn=64",
    f"data.paths={json.dumps(DOMAIN)}",
]


def _make_export(root: str) -> str:
    """A 2-layer model with 2 MTP heads -> HF export through the project's converter (write_hf), sidecar heads."""
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.convert import megatron_world
    from mtpd_megatron.convert.to_hf import tokenizer_info, write_hf
    from mtpd_megatron.data.tokenizer import save_tokenizer, train_bpe
    from mtpd_megatron.model.builder import build_model

    r = Path(root)
    texts = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
    tok = train_bpe(texts, vocab_size=384)
    save_tokenizer(tok, r / "tok")
    cfg = config_from_dict(
        {
            "model": dict(
                num_layers=2,
                hidden_size=64,
                ffn_hidden_size=128,
                num_attention_heads=4,
                num_query_groups=2,
                qk_layernorm=True,
                max_position_embeddings=128,
                vocab_size=tok.get_vocab_size(with_added_tokens=True),
            ),
            "mtp": {"num_heads": 2},
            "data": {"tokenizer": str(r / "tok" / "tokenizer.json")},
        }
    )
    with megatron_world():
        torch.manual_seed(0)
        sd = build_model(cfg, vocab_size=384).state_dict()
    out = r / "export"
    out.mkdir()
    write_hf(
        cfg,
        lambda names: {n: sd[n] for n in names},
        out,
        vocab_rows=384,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        tokenizer=tokenizer_info(str(r / "tok" / "tokenizer.json")),
        dtype=torch.float32,
        progress=False,
    )
    return str(out)


def _env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def _run(args: list, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posttrain")
    return Path(run_distributed(_make_export, 1, str(root))[0])


@pytest.fixture(scope="module")
def runs(export, tmp_path_factory):
    """ZeRO-3 experiment (frozen, mtpd) and a ZeRO-2 finetune_hf.py run of mtpd with the same settings."""
    root = tmp_path_factory.mktemp("runs")
    exp = _run(
        [
            "tools/run_posttrain_experiment.py",
            "--export",
            str(export),
            "--out",
            str(root / "exp"),
            "--arms",
            "frozen,mtpd",
            "--zero-stage",
            "3",
            "--train-iters",
            "3",
            "--device",
            "cpu",
            *TINY,
        ]
    )
    assert exp.returncode == 0, exp.stderr[-3000:]
    z2 = _run(
        [
            "tools/finetune_hf.py",
            "--model",
            str(export),
            "--out",
            str(root / "z2"),
            "--heads",
            "mtpd",
            "--zero-stage",
            "2",
            "--train-iters",
            "3",
            "--device",
            "cpu",
            *TINY,
        ]
    )
    assert z2.returncode == 0, z2.stderr[-3000:]
    return {"exp": root / "exp", "z2": root / "z2", "exp_log": exp.stdout, "z2_log": z2.stdout}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")) + sorted((path / "mtp").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_zero3_equals_zero2_and_heads_round_trip(export, runs):
    from mtpd_megatron.inference.hf_mtp import locate_heads

    z3, z2, src = _tensors(runs["exp"] / "mtpd" / "export"), _tensors(runs["z2"]), _tensors(export)
    assert z3.keys() == z2.keys() == src.keys()
    heads = set(locate_heads(export)["files"])
    assert len(heads) > 10 and heads <= set(z3)
    for name in z3:  # ZeRO-3's gathered partitions = ZeRO-2's full parameters after the same steps, up to
        # reduction order (Adam's first steps are ~lr * sign(grad): tiny gradients amplify rounding a little)
        update = (z2[name] - src[name]).abs().max()
        assert (z3[name] - z2[name]).abs().max() <= 0.01 * update + 1e-7, name
    moved = {n for n in z3 if not torch.equal(z3[n], src[n])}
    assert heads & moved and (set(z3) - heads) & moved  # both the heads and the main model trained
    frozen = _tensors(runs["exp"] / "frozen" / "export")
    assert all(torch.equal(frozen[n], src[n]) for n in heads)  # frozen heads: bitwise the export's
    assert any(not torch.equal(frozen[n], src[n]) for n in set(src) - heads)
    for path in (runs["z2"], runs["exp"] / "mtpd" / "export"):
        record = json.loads((path / "mtpd_posttrain.json").read_text())
        assert record["draft"]["equal"] and record["draft"]["steps"] > 0  # reloaded, drafted = greedy
        assert record["eval"]["num_heads"] == 2 and len(record["eval"]["a"]) == 2
        assert locate_heads(path)["layout"] == "sidecar" and (path / "custom_generate" / "generate.py").is_file()
        assert (path / "tokenizer.json").read_bytes() == (export / "tokenizer.json").read_bytes()
    assert record["config"]["deepspeed"]["zero_stage"] == 3 and "ZeRO-3" in runs["exp_log"]


def test_experiment_outputs(runs):
    result = json.loads((runs["exp"] / "results.json").read_text())
    assert [r["arm"] for r in result["checkpoints"]] == ["pretrained", "frozen", "mtpd"]
    for r in result["checkpoints"]:
        assert r["main_loss"] > 0 and len(r["a"]) == len(r["car"]) == 2 and r["tau"] >= 1
    table = (runs["exp"] / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 4 and "ZeRO-3" in table
    assert (runs["exp"] / "acceptance.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_equals_reference():
    """posttrain_loss = CE_main + factor/K sum_k mean(alpha_k CE_k + beta_k KL_k) with the heads aligned as
    mtpd/hook.py aligns them (head k at t vs main at t+k), per mtpd/reference.py in float64, gradients too."""
    from mtpd_megatron.config.schema import MTPConfig, MTPDConfig
    from mtpd_megatron.mtpd.reference import reference_head_loss
    from mtpd_megatron.posttrain.loss import head_objective, posttrain_loss

    g = torch.Generator().manual_seed(0)
    b, s, v, k = 2, 7, 50, 3
    mtp = MTPConfig(
        num_heads=k,
        loss_scaling_factor=0.6,
        mtpd=MTPDConfig(alpha=[1.0, 0.5, 2.0], beta=[1.0, 2.0, 0.3], topn=12, temperature=1.7, mode="tail"),
    )
    main = torch.randn(b, s, v, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(b, s, v, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(k)]
    labels = torch.randint(0, v, (b, s), generator=g)
    for mode in ("mtpd", "ce"):
        obj = head_objective(mtp, mode)
        got = posttrain_loss(main, heads, labels, obj)
        want = torch.nn.functional.cross_entropy(main.reshape(-1, v), labels.reshape(-1))
        for j, z in enumerate(heads, start=1):
            beta = mtp.mtpd.beta[j - 1] if mode == "mtpd" else 0.0
            loss, _, _ = reference_head_loss(
                z[:, : s - j].reshape(-1, v),
                main[:, j:].reshape(-1, v),
                labels[:, j:].reshape(-1),
                alpha=mtp.mtpd.alpha[j - 1],
                beta=beta,
                topn=12,
                direction="forward",
                mode="tail",
                temperature=1.7,
            )
            want = want + 0.6 / k * loss.mean()
        assert torch.allclose(got.loss, want, rtol=1e-10, atol=1e-12), mode
        grads = torch.autograd.grad(got.loss, [main, *heads])
        ref = torch.autograd.grad(want, [main, *heads])
        for x, y in zip(grads, ref):  # the teacher is detached in both: main's gradient is its CE's alone
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    assert head_objective(mtp, "frozen") is None
    assert posttrain_loss(main, heads, labels, None).head_ce == []


def _fails(capsys, argv, needle, tmp_path):
    from mtpd_megatron.posttrain.cli import cli

    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) if needle.startswith("usage:") else _no_raise():
        rc = cli(argv)
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("finetune_hf.py: error:"), err
    assert needle.removeprefix("usage:") in err, err
    assert set(tmp_path.iterdir()) == before  # nothing written


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_flags_and_configs_are_one_line(export, tmp_path, capsys):
    out = ["--model", str(export), "--out", str(tmp_path / "o")]
    _fails(capsys, [*out, "--heads", "kl"], "usage:--heads: invalid choice", tmp_path)
    _fails(capsys, [*out, "--zero-stage", "1"], "usage:--zero-stage: invalid choice", tmp_path)
    _fails(capsys, [*out, "deepspeed.zero_stage=1"], "deepspeed.zero_stage=1: must be 2 or 3", tmp_path)
    _fails(capsys, [*out, "training.lrr=1e-4"], "training.lrr: unknown key (did you mean 'lr'?)", tmp_path)
    _fails(capsys, [*out, "mtp.num_heads=3"], "mtp.num_heads=3: the export has 2 MTP heads", tmp_path)
    _fails(capsys, [*out, "mtp.mtpd.enabled=false"], "contradicts heads=mtpd", tmp_path)
    _fails(capsys, [*out, "mtp.mtpd.beta=[1,2,3]"], "mtp.mtpd.beta=[1, 2, 3]: needs one entry per MTP head", tmp_path)
    _fails(capsys, [*out, "mtp.mtpd.topn=1000"], "exceeds the padded vocabulary (384)", tmp_path)
    _fails(capsys, [*out, "data.paths=[/nonexistent]"], "data.paths='/nonexistent': no such file", tmp_path)
    _fails(capsys, ["--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "model.path=", tmp_path)
    _fails(capsys, ["--model", str(export), "--out", str(export), "mtp.mtpd.topn=64"], "already exists", tmp_path)
    _fails(capsys, ["--out", str(tmp_path / "o")], "model.path: not set", tmp_path)
    (tmp_path / "bad.yaml").write_text("training: {lr: [1]}\n")
    _fails(
        capsys,
        [*out, "--config", str(tmp_path / "bad.yaml"), "mtp.mtpd.topn=64"],
        "training.lr: expected a number",
        tmp_path,
    )
