"""Checkpoint conversion megatron torch_dist <-> Hugging Face (mtpd_megatron/convert).

One module-scoped build does the expensive parts once:
  1. two gloo ranks build the tiny dense model at TP2 and the tiny MoE model at TP2/EP2/SP (4 MTP heads each
     in the presets; 2 here), perturb every weight (expert bias included) identically on replicas, record
     megatron's logits (main + every MTP depth) and save torch_dist checkpoints in the manager's layout;
  2. one process converts: ckpt -> HF, HF -> ckpt (--tp 2 --ep 2), ckpt -> HF again, plus variants.
The tests then load the HF directories with stock transformers (no remote code) and compare. The MTP heads go to
the export's `mtp/` sidecar by default (the main files hold exactly the stock class's keys); drafting with them runs
transformers' own MTP code through inference/hf_mtp.py, and tools/attach_mtp_heads.py puts them back after a
transformers fine-tune.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from distributed_harness import run_distributed

REPO = Path(__file__).resolve().parents[1]
SEQ = 16

TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=2,
    qk_layernorm=True,
    max_position_embeddings=64,
    rotary_base=10000,
)
DENSE = {"model": TINY, "parallel": {"tensor_model_parallel_size": 2}, "mtp": {"num_heads": 2}}
MOE = {  # configs/tiny_moe.yaml's architecture
    "model": {
        **TINY,
        "moe": {
            "num_experts": 4,
            "router_topk": 2,
            "ffn_hidden_size": 64,
            "shared_expert_hidden_size": 64,
            "layer_freq": [0, 1],
            "score_function": "sigmoid",
            "expert_bias": True,
            "load_balancing_type": "none",
        },
    },
    "parallel": {
        "tensor_model_parallel_size": 2,
        "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 1,
        "sequence_parallel": True,
    },
    "mtp": {"num_heads": 2},
}
# Single-process variants for the other mapping tables (TP1): every class mapping.py can choose.
_SMALL_MOE = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 48}
VARIANTS = {
    "llama": {"model": {**TINY, "qk_layernorm": False, "tie_embeddings": True}, "mtp": {"num_heads": 1}},
    "qwen3_moe": {
        "model": {**TINY, "moe": {**_SMALL_MOE, "layer_freq": [1, 0], "score_function": "softmax"}},
        "mtp": {"num_heads": 1},
    },
    "mixtral": {
        "model": {**TINY, "qk_layernorm": False, "moe": {**_SMALL_MOE, "score_function": "softmax"}},
        "mtp": {"num_heads": 1},
    },
    "glm4_moe": {
        "model": {**TINY, "qk_layernorm": False, "moe": {**_SMALL_MOE, "router_topk": 1, "score_function": "sigmoid"}},
        "mtp": {"num_heads": 1},
    },
}

GLM46 = {
    "model": {
        **TINY,
        "vocab_size": 256,
        "num_layers": 46,
        "moe": {**_SMALL_MOE, "score_function": "sigmoid", "layer_freq": [0] + [1] * 45},
    },
    "mtp": {"num_heads": 1},
}


# ----------------------------------------------------------------------------------------------------------
# Workers (module level: they run in spawned ranks)
# ----------------------------------------------------------------------------------------------------------


def _perturb(model) -> None:
    """Deterministic per-name noise: replicas (norms, routers) stay identical across ranks."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            if name.endswith("expert_bias"):
                t.copy_(0.1 * noise)
            elif t.dim() == 1:
                t.mul_(1 + 0.1 * noise)
            else:
                t.add_(0.01 * noise)


def _megatron_logits(model, tokens):
    """Main logits [b, s, V/tp] and every MTP depth's logits (megatron's own forward with labels)."""
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    captured = []
    hook = model.output_layer.register_forward_hook(
        lambda m, i, o: captured.append(o[0].detach().transpose(0, 1).clone())
    )
    with torch.no_grad():
        model(tokens, pos, None, labels=torch.roll(tokens, -1, 1))
    hook.remove()
    # process_mtp_loss runs the shared head per depth, then the main head (clone: the CE works in place)
    return captured[-1], captured[:-1]


def _make_checkpoints(root: str, vocab: int, tokenizer: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.checkpoint.metadata import build_meta
    from mtpd_megatron.checkpoint.weights import save_model_weights
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.model.builder import build_model, padded_vocab_size

    out = {}
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for name, raw in (("dense", DENSE), ("moe", MOE)):
        p = raw["parallel"]
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p["tensor_model_parallel_size"],
            expert_model_parallel_size=p.get("expert_model_parallel_size", 1),
            expert_tensor_parallel_size=p.get("expert_tensor_parallel_size"),
        )
        model_parallel_cuda_manual_seed(7)
        cfg = config_from_dict(
            {**raw, "model": {**raw["model"], "vocab_size": vocab}, "data": {"tokenizer": tokenizer}}
        )
        padded = padded_vocab_size(vocab, 128, p["tensor_model_parallel_size"])
        model = build_model(cfg, vocab_size=padded)
        _perturb(model)
        model.eval()
        main, mtp = _megatron_logits(model, tokens)
        meta = build_meta(cfg, iteration=5, vocab_size=vocab, padded_vocab_size=padded, stage="test")
        save_model_weights(model, Path(root) / f"ck_{name}", meta)
        out[name] = {"main": main, "mtp": mtp}
        ps.destroy_model_parallel()
    out["tokens"] = tokens
    return out


def _convert_all(root: str) -> dict:
    """All conversions in one process (imports once). Returns error messages of the in-world failure cases."""
    from mtpd_megatron.convert import ConvertError
    from mtpd_megatron.convert.from_hf import convert_from_hf
    from mtpd_megatron.convert.to_hf import convert_to_hf

    r = Path(root)
    for name in ("dense", "moe"):
        convert_to_hf(str(r / f"ck_{name}"), str(r / f"hf_{name}"), progress=False)
        convert_from_hf(str(r / f"hf_{name}"), str(r / f"rt_ck_{name}"), tp=2, ep=2, progress=False)
        convert_to_hf(str(r / f"rt_ck_{name}"), str(r / f"rt_hf_{name}"), progress=False)
    convert_to_hf(str(r / "ck_moe"), str(r / "hf_moe_sharded"), max_shard_bytes=200_000, progress=False)
    convert_to_hf(str(r / "ck_dense"), str(r / "hf_dense_bf16"), dtype="bf16", progress=False)
    convert_to_hf(str(r / "ck_moe"), str(r / "hf_moe_inline"), mtp="inline", progress=False)
    convert_to_hf(str(r / "ck_dense"), str(r / "hf_dense_none"), mtp="none", progress=False)
    convert_from_hf(str(r / "hf_dense"), str(r / "ck_dense_nomtp"), mtp="none", progress=False)
    convert_from_hf(str(r / "hf_dense"), str(r / "ck_dense_init"), mtp="init", mtp_heads=3, progress=False)
    convert_to_hf(str(r / "ck_dense_init"), str(r / "hf_dense_init"), progress=False)
    # --config: everything but the weights (and the parallel layout) comes from the training YAML
    (r / "moe.yaml").write_text(json.dumps({**MOE, "training": {"seed": 99}}))
    convert_from_hf(str(r / "hf_moe"), str(r / "ck_moe_config"), config=str(r / "moe.yaml"), progress=False)
    # a tensor missing from an otherwise valid HF file: detected after the output directory was started
    broken = r / "hf_missing_tensor"
    shutil.copytree(r / "hf_dense", broken)
    from safetensors.torch import load_file, save_file

    shard = next(broken.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    errors = {}
    try:
        convert_from_hf(str(broken), str(r / "ck_from_missing"), progress=False)
    except ConvertError as e:
        errors["missing_tensor"] = str(e)
    return errors


def _reload(root: str, tokens) -> dict:
    """Imported checkpoints (saved from one TP1 process) load at other layouts, as the trainer/inference load:
    MoE at TP2/EP2/SP (logits returned), dense at PP2 (re-saved there, for the to_hf CLI to read)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.checkpoint import layout
    from mtpd_megatron.checkpoint.manager import sharded_metadata
    from mtpd_megatron.checkpoint.metadata import build_meta
    from mtpd_megatron.checkpoint.weights import save_model_weights
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.model.builder import build_model

    r = Path(root)
    out = {}
    pp2 = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    for name, parallel in (("moe", {}), ("dense", pp2)):
        ckpt = r / f"rt_ck_{name}" / "iter_0000000"
        meta = layout.read_meta(ckpt)
        raw = meta["config"]
        cfg = config_from_dict({**raw, "parallel": {**raw["parallel"], **parallel}})
        p = cfg.parallel
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        )
        model_parallel_cuda_manual_seed(1)
        model = build_model(cfg, vocab_size=meta["padded_vocab_size"])
        sd = {"model": model.sharded_state_dict(metadata=sharded_metadata())}
        model.load_state_dict(dist_checkpointing.load(sd, str(ckpt))["model"], strict=True)
        if name == "moe":
            model.eval()
            out["moe"] = _megatron_logits(model, tokens)[0]
        else:
            save_model_weights(
                model,
                r / "ck_dense_pp2",
                build_meta(
                    cfg,
                    iteration=1,
                    vocab_size=meta["vocab_size"],
                    padded_vocab_size=meta["padded_vocab_size"],
                    stage="test",
                ),
            )
        ps.destroy_model_parallel()
    return out


def _variants(root: str) -> dict:
    """TP1 models of the other mapping tables -> HF (via write_hf) and back (from_hf); megatron logits."""
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.convert import megatron_world
    from mtpd_megatron.convert.from_hf import convert_from_hf
    from mtpd_megatron.convert.to_hf import convert_to_hf, write_hf
    from mtpd_megatron.model.builder import build_model

    out = {}
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(5))
    for name, raw in VARIANTS.items():
        cfg = config_from_dict({**raw, "model": {**raw["model"], "vocab_size": 256}})
        with megatron_world():
            model = build_model(cfg, vocab_size=256)
            _perturb(model)
            model.eval()
            main, mtp = _megatron_logits(model, tokens)
            sd = model.state_dict()
            hf = Path(root) / f"hf_{name}"
            hf.mkdir()
            summary = write_hf(
                cfg,
                lambda names, sd=sd: {n: sd[n] for n in names},
                hf,
                vocab_rows=256,
                vocab_size=256,
                dtype=torch.float32,
                progress=False,
            )
        convert_from_hf(str(hf), str(Path(root) / f"ck_{name}"), progress=False)
        convert_to_hf(str(Path(root) / f"ck_{name}"), str(Path(root) / f"rt_hf_{name}"), progress=False)
        # a directory written by transformers itself (its config.json spelling, no MTP heads) imports too
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(hf)))
        fresh.save_pretrained(str(Path(root) / f"fresh_{name}"))
        convert_from_hf(
            str(Path(root) / f"fresh_{name}"), str(Path(root) / f"ck_fresh_{name}"), mtp="none", progress=False
        )
        convert_to_hf(str(Path(root) / f"ck_fresh_{name}"), str(Path(root) / f"rt_fresh_{name}"), progress=False)
        out[name] = {"main": main, "mtp": mtp, "arch": summary["arch"]}
    out["tokens"] = tokens
    # GLM-4.5-Air's shape (46 layers, one head): the stock class declares layer 46 as its MTP layer -> inline
    cfg = config_from_dict(GLM46)
    with megatron_world():
        model = build_model(cfg, vocab_size=256)
        _perturb(model)
        sd = model.state_dict()
        (Path(root) / "hf_glm46").mkdir()
        out["glm46"] = write_hf(
            cfg,
            lambda names: {n: sd[n] for n in names},
            Path(root) / "hf_glm46",
            vocab_rows=256,
            vocab_size=256,
            dtype=torch.float32,
            progress=False,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: OpenMP threads only spin against the other test processes (20x slower generate here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mtpd_megatron.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("convert")
    tok = train_bpe([f"word{i} token{i % 7} the quick brown fox {i * 13}" for i in range(200)], vocab_size=300)
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    refs = run_distributed(_make_checkpoints, 2, str(root), vocab, str(root / "tok" / "tokenizer.json"))
    errors = run_distributed(_convert_all, 1, str(root))[0]
    reloaded = run_distributed(_reload, 2, str(root), refs[0]["tokens"])
    return {"root": root, "vocab": vocab, "refs": refs, "errors": errors, "reloaded": reloaded}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return root, run_distributed(_variants, 1, str(root))[0]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _gathered(refs, name, key):
    """Concatenate the TP ranks' vocabulary shards."""
    if key == "main":
        return torch.cat([r[name]["main"] for r in refs], dim=-1)
    return [torch.cat([r[name]["mtp"][k] for r in refs], dim=-1) for k in range(len(refs[0][name]["mtp"]))]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _files(path: Path) -> dict:
    """Every weight file, the MTP sidecar's included (and its manifest)."""
    found = sorted(path.glob("*.safetensors")) + sorted((path / "mtp").glob("*"))
    return {str(p.relative_to(path)): p.read_bytes() for p in found}


def _keys(path: Path) -> set:
    """The tensors of a directory's weight files (its index, or its single model.safetensors)."""
    from mtpd_megatron.inference.hf_mtp import weight_files

    return set(weight_files(path))


# ----------------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("dense", "Qwen3ForCausalLM"), ("moe", "Glm4MoeForCausalLM")])
def test_hf_logits_equal_megatron(built, name, cls):
    """TP2 (and TP2/EP2/SP MoE) checkpoints -> stock transformers: same logits on random tokens (fp32)."""
    model = _load(built["root"] / f"hf_{name}")
    assert type(model).__name__ == cls
    tokens = built["refs"][0]["tokens"]
    with torch.no_grad():
        logits = model(tokens).logits
    ref = _gathered(built["refs"], name, "main")
    assert logits.shape == ref.shape
    assert _rel(logits, ref) <= 1e-4


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_mtp_heads_equal_megatron(built, name):
    """The exported heads, run by transformers' own MtpModel (loaded by inference/hf_mtp.py from the sidecar), give
    megatron's per-depth logits."""
    from mtpd_megatron.inference.hf_mtp import load_mtp_model, teacher_forced_logits

    model = _load(built["root"] / f"hf_{name}")
    mtp = load_mtp_model(model, built["root"] / f"hf_{name}")
    assert len(mtp.layers) == 2
    tokens = built["refs"][0]["tokens"]
    ours = teacher_forced_logits(model, mtp, tokens)
    for k, ref in enumerate(_gathered(built["refs"], name, "mtp")):
        valid = SEQ - (k + 1)  # megatron zero-fills the rolled-in tokens at the end
        assert _rel(ours[k][:, :valid], ref[:, :valid]) <= 1e-4, f"depth {k + 1}"


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_mtp_heads_load_without_get_weight_conversions(built, name, monkeypatch):
    """transformers releases before MtpModel.get_weight_conversions (the GPU machine's) load the same heads through
    the list hf_mtp builds from the same pieces: every head tensor equal to what the newer method loads."""
    from transformers.modeling_layers import MtpModel

    from mtpd_megatron.inference.hf_mtp import load_mtp_model

    model = _load(built["root"] / f"hf_{name}")
    newer = {k: v.clone() for k, v in load_mtp_model(model, built["root"] / f"hf_{name}").layers.state_dict().items()}
    monkeypatch.delattr(MtpModel, "get_weight_conversions")
    older = load_mtp_model(model, built["root"] / f"hf_{name}").layers.state_dict()
    assert newer.keys() == older.keys() and all(torch.equal(newer[k], older[k]) for k in newer)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_mtp_layer_forward_without_forward_layer(built, name, monkeypatch):
    """Without MtpModel.forward_layer (transformers 5.17, the GPU machine's) the heads' teacher-forced logits are
    computed from MtpModel's parts, equal to what forward_layer gives."""
    from transformers.modeling_layers import MtpModel

    from mtpd_megatron.inference.hf_mtp import load_mtp_model, teacher_forced_logits

    model = _load(built["root"] / f"hf_{name}")
    mtp = load_mtp_model(model, built["root"] / f"hf_{name}")
    tokens = built["refs"][0]["tokens"]
    newer = teacher_forced_logits(model, mtp, tokens)
    monkeypatch.delattr(MtpModel, "forward_layer")
    older = teacher_forced_logits(model, mtp, tokens)
    assert len(newer) == len(older) == 2 and all(torch.equal(a, b) for a, b in zip(newer, older))


def test_round_trip_bitwise(built):
    """HF -> megatron (saved for TP2/EP2) -> HF reproduces every byte of the weights, MTP heads (sidecar) included."""
    root = built["root"]
    for name in ("dense", "moe"):
        a, b = _files(root / f"hf_{name}"), _files(root / f"rt_hf_{name}")
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), name
        config = (root / f"hf_{name}" / "config.json").read_bytes()
        assert config == (root / f"rt_hf_{name}" / "config.json").read_bytes()
        assert "mtp/model.safetensors.index.json" in a  # 2 layers + 2 heads: the heads in the sidecar
        assert any(k.startswith("model.layers.3.eh_proj") for k in _keys(root / f"hf_{name}" / "mtp"))
    meta = json.loads((root / "rt_ck_moe" / "iter_0000000" / "mtpd_checkpoint.json").read_text())
    assert meta["vocab_size"] == built["vocab"] and meta["padded_vocab_size"] == 512
    assert meta["config"]["parallel"]["expert_model_parallel_size"] == 2
    assert meta["config"]["mtp"]["num_heads"] == 2 and meta["source"]["mtp"] == "copied"
    assert (root / "rt_ck_moe" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"


def test_import_loads_at_other_layouts(built, tmp_path):
    """The TP1-saved import loads at TP2/EP2/SP with megatron's resharding (same logits as the original), and a
    PP2 re-save of the dense import converts back (tool CLI) to the very same HF weights."""
    ref = _gathered(built["refs"], "moe", "main")
    assert _rel(torch.cat([r["moe"] for r in built["reloaded"]], dim=-1), ref) <= 1e-5
    out = tmp_path / "hf_from_pp2"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_to_hf.py"),
            "--ckpt",
            str(built["root"] / "ck_dense_pp2"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _files(out) == _files(built["root"] / "hf_dense")
    assert (out / "config.json").read_bytes() == (built["root"] / "hf_dense" / "config.json").read_bytes()


def test_checkpoint_metadata_matches_manager(built):
    """The imported checkpoint passes the CheckpointManager's own verification and compatibility check."""
    from mtpd_megatron.checkpoint import layout
    from mtpd_megatron.checkpoint.metadata import check_compatible
    from mtpd_megatron.config import config_from_dict

    ckpt = built["root"] / "rt_ck_moe" / "iter_0000000"
    assert layout.verify(ckpt) is None
    meta = layout.read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    check_compatible(meta, cfg, built["vocab"], 512, "test")


def test_sharded_bf16_and_tokenizer(built):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    root = built["root"]
    index = json.loads((root / "hf_moe_sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert {k for k in _files(root / "hf_moe_sharded") if "/" not in k} == set(files)
    heads = json.loads((root / "hf_moe_sharded" / "mtp" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(heads.values())) > 1  # the sidecar is sharded by the same --max-shard-size
    model = _load(root / "hf_moe_sharded")
    with torch.no_grad():
        assert _rel(model(built["refs"][0]["tokens"]).logits, _gathered(built["refs"], "moe", "main")) <= 1e-4
    with safe_open(str(root / "hf_dense_bf16" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(root / "hf_dense"))
    gen = json.loads((root / "hf_dense" / "generation_config.json").read_text())
    assert len(tok) == built["vocab"] and gen["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>") == 0


def test_config_driven_import(built):
    """With --config the metadata carries the YAML's own values (what the manager compares on resume)."""
    meta = json.loads((built["root"] / "ck_moe_config" / "iter_0000000" / "mtpd_checkpoint.json").read_text())
    assert meta["config"]["training"]["seed"] == 99
    assert meta["config"]["model"]["moe"]["layer_freq"] == [0, 1] and meta["config"]["model"]["kv_channels"] is None
    assert {k: meta["config"]["parallel"][k] for k in MOE["parallel"]} == MOE["parallel"]
    assert meta["padded_vocab_size"] == 512 and meta["config"]["data"]["tokenizer"].endswith("tokenizer/tokenizer.json")


def test_mtp_modes(built):
    """--mtp none drops the heads, --mtp init makes fresh ones (megatron init) alongside copied weights."""
    root = built["root"]
    meta = json.loads((root / "ck_dense_nomtp" / "iter_0000000" / "mtpd_checkpoint.json").read_text())
    assert meta["config"]["mtp"]["num_heads"] == 0
    manifest = json.loads((root / "hf_dense_init" / "mtp" / "mtp_heads.json").read_text())
    assert manifest["num_heads"] == 3 and manifest["num_hidden_layers"] == 2
    from safetensors import safe_open

    with (
        safe_open(str(root / "hf_dense_init" / "model-00001-of-00001.safetensors"), "pt") as f,
        safe_open(str(root / "hf_dense" / "model-00001-of-00001.safetensors"), "pt") as g,
    ):
        assert torch.equal(
            f.get_tensor("model.layers.1.mlp.down_proj.weight"), g.get_tensor("model.layers.1.mlp.down_proj.weight")
        )
    with (
        safe_open(str(root / "hf_dense_init" / "mtp" / "model-00001-of-00001.safetensors"), "pt") as f,
        safe_open(str(root / "hf_dense" / "mtp" / "model-00001-of-00001.safetensors"), "pt") as g,
    ):
        assert not torch.equal(
            f.get_tensor("model.layers.2.eh_proj.weight"), g.get_tensor("model.layers.2.eh_proj.weight")
        )
        assert torch.all(f.get_tensor("model.layers.4.enorm.weight") == 1)


def test_other_architectures(variants):
    """Llama (tied), Qwen3-MoE (dense layer in the pattern), Mixtral and GLM (top-1, no shared expert): logits
    equal, the key layout equals what transformers' own save_pretrained writes, and a round trip is bitwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mtpd_megatron.inference.hf_mtp import load_mtp_model, teacher_forced_logits

    root, res = variants
    for name in VARIANTS:
        assert res[name]["arch"] == name
        model = _load(root / f"hf_{name}")
        with torch.no_grad():
            logits = model(res["tokens"]).logits
        assert _rel(logits, res[name]["main"]) <= 1e-4, name
        with safe_open(str(next((root / f"fresh_{name}").glob("*.safetensors"))), "pt") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            fresh = {k: f.get_tensor(k) for k in f.keys()}
        index = json.loads((root / f"hf_{name}" / "model.safetensors.index.json").read_text())["weight_map"]
        ours = {}
        for k, file in index.items():  # the main files: exactly what transformers' own save_pretrained writes
            with safe_open(str(root / f"hf_{name}" / file), "pt") as f:
                ours[k] = tuple(f.get_slice(k).get_shape())
        assert ours == theirs, name
        assert _files(root / f"hf_{name}") == _files(root / f"rt_hf_{name}"), name
        back = {}
        for file in (root / f"rt_fresh_{name}").glob("*.safetensors"):
            back.update(load_file(str(file)))
        assert back.keys() == fresh.keys() and all(torch.equal(back[k], fresh[k]) for k in fresh), name
        mtp = load_mtp_model(model, root / f"hf_{name}")
        logits = teacher_forced_logits(model, mtp, res["tokens"])[0]
        assert _rel(logits[:, :-1], res[name]["mtp"][0][:, :-1]) <= 1e-4, name


# ----------------------------------------------------------------------------------------------------------
# Serving: strict keys, drafting with every head in transformers, heads surviving a fine-tune
# ----------------------------------------------------------------------------------------------------------


def _stock_keys(path: Path, tmp: Path) -> set:
    """The keys the stock class's own save_pretrained writes for this config (Hub layout: per-expert tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    fresh.save_pretrained(str(tmp))
    keys = set()
    for file in tmp.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("name,cls", [("dense", "Qwen3ForCausalLM"), ("moe", "Glm4MoeForCausalLM")])
def test_exports_load_clean_with_stock_keys(built, name, cls, tmp_path, caplog):
    """The default export's main files hold exactly the stock class's keys (what a strict loader like vLLM's needs):
    transformers loads it with an empty report (no unexpected, missing or mismatched key, no LOAD REPORT line)."""
    from transformers import AutoModelForCausalLM

    path = built["root"] / f"hf_{name}"
    assert _keys(path) == _stock_keys(path, tmp_path / "fresh")
    if name == "dense":  # no fused experts: the in-memory state dict has the same names as the files
        assert _keys(path) == set(_load(path).state_dict())
    with caplog.at_level("WARNING"):
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == cls
    assert not any(info.values()), info
    assert "LOAD REPORT" not in caplog.text
    conf = json.loads((path / "config.json").read_text())
    assert conf.get("num_nextn_predict_layers", 0) == 0 and "num_mtp_layers" not in conf  # the files hold no heads
    assert (path / "custom_generate" / "generate.py").is_file()
    # --mtp inline (for vLLM/SGLang GLM MTP): heads in the main files and config.json; --mtp none: no heads at all
    moe, inline = built["root"] / "hf_moe", built["root"] / "hf_moe_inline"
    assert _keys(inline) - _keys(moe) == _keys(moe / "mtp") and not (inline / "mtp").exists()
    assert json.loads((inline / "config.json").read_text())["num_nextn_predict_layers"] == 2
    none = built["root"] / "hf_dense_none"
    assert _files(none) == {k: v for k, v in _files(built["root"] / "hf_dense").items() if not k.startswith("mtp/")}
    assert not (none / "custom_generate").exists()


def _cascade_drafts(model, mtp, seq: list, k: int, vocab: int) -> list:
    """The K drafts for the prefix `seq`, recomputed without any cache (reference for transformers' MTP cache)."""
    from mtpd_megatron.inference.hf_mtp import forward_mtp_layer

    ids = torch.tensor([seq])
    hidden = model.get_decoder()(input_ids=ids[:, :-1]).last_hidden_state
    ext, drafts = list(seq), []
    for depth in range(k):
        tokens = torch.tensor([ext[depth + 1 : len(seq) + depth]])
        positions = torch.arange(depth + 1, len(seq) + depth)[None]
        hidden = forward_mtp_layer(mtp, depth, hidden, positions, input_ids=tokens)
        logits = mtp._project_to_logits(hidden[:, -1])[0]
        drafts.append(int(logits[:vocab].argmax()))
        ext.append(drafts[-1])
    return drafts


def _agreeing_copy(src: Path, dst: Path) -> None:
    """A copy whose heads agree with the main model (so drafts get accepted): every layer's o_proj/down_proj zero
    (layers are identities, the model predicts from the current token alone), each head's eh_proj = [I | 0] and
    shared_head.norm = the final norm, so head k at t predicts what the model predicts at t+k; the last head gets
    a little noise, for partly accepted steps."""
    from safetensors.torch import load_file, save_file

    from mtpd_megatron.inference.hf_mtp import head_index, locate_heads

    shutil.copytree(src, dst)
    L = json.loads((dst / "config.json").read_text())["num_hidden_layers"]
    K = locate_heads(dst)["num_heads"]
    files = sorted(dst.glob("model-*.safetensors")) + sorted((dst / "mtp").glob("model-*.safetensors"))
    norm = next(t["model.norm.weight"] for t in map(load_file, map(str, files)) if "model.norm.weight" in t)
    for file in files:
        tensors = load_file(str(file))
        for n, t in tensors.items():
            k = head_index(n, L)
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[n] = torch.zeros_like(t)
            elif k is not None and n.endswith("eh_proj.weight"):
                h = t.shape[0]
                tensors[n] = torch.cat([torch.eye(h), torch.zeros(h, h)], 1)
                if k == K - 1:
                    tensors[n] += 0.05 * torch.randn(h, 2 * h, generator=torch.Generator().manual_seed(0))
            elif k is not None and n.endswith("enorm.weight"):
                tensors[n] = torch.ones_like(t)
            elif k is not None and n.endswith("shared_head.norm.weight"):
                tensors[n] = norm.clone()
        save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_mtp_generate_equals_greedy(built, name, tmp_path):
    """generate(use_mtp=True) — transformers' own MTP drafting, fed the sidecar heads by hf_mtp.enable_mtp — drafts
    with all K heads every step, its drafts equal a cache-free recomputation of the cascade, and the output equals
    plain greedy generation, for K = 1..num_heads; with agreeing heads drafts are accepted (fully and partly)."""
    from mtpd_megatron.inference.hf_mtp import enable_mtp

    vocab = built["vocab"]
    agree = tmp_path / "agree"
    _agreeing_copy(built["root"] / f"hf_{name}", agree)
    for path, ks in ((built["root"] / f"hf_{name}", (1, 2)), (agree, (2,))):
        model = _load(path)
        for k in ks:
            mtp = enable_mtp(model, path, k)
            gen, accepted, steps = torch.Generator().manual_seed(11), [], 0
            for _ in range(2):
                prompt = torch.randint(2, vocab, (1, 5), generator=gen)
                ref = model.generate(prompt, max_new_tokens=20, do_sample=False)
                out = model.generate(prompt, max_new_tokens=20, do_sample=False, use_mtp=True)
                assert torch.equal(out, ref), (path.name, k)
                record = mtp.mtp_record
                assert record["drafts"] and all(len(d) == k for d in record["drafts"][:-1])
                seq = out[0].tolist()
                n = prompt.shape[1] + 1
                for drafts, a in zip(record["drafts"], record["accepted"] + [None]):
                    assert _cascade_drafts(model, mtp, seq[:n], len(drafts), vocab) == drafts
                    if a is None:
                        break
                    n += a + 1
                accepted += record["accepted"]
                steps += len(record["drafts"])
            if path == agree:
                assert k in accepted and any(0 < a < k for a in accepted)  # fully and partly accepted steps
                assert sum(accepted) > len(accepted) / 2  # > 1.5 tokens per main forward
            elif k == 1:
                assert 0 in accepted


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_finetune_then_reattach_bitwise(built, name, tmp_path):
    """A fine-tune through transformers (one optimizer step, save_pretrained) keeps the stock keys only and a
    config.json that declares no heads; tools/attach_mtp_heads.py puts the export's heads back bitwise (from the
    export's sidecar, in place, and from the megatron checkpoint, into a copy), and the result drafts with them."""
    from transformers import AutoModelForCausalLM

    from mtpd_megatron.convert.mtp_heads import attach_heads
    from mtpd_megatron.inference.hf_mtp import enable_mtp

    export = built["root"] / f"hf_{name}"
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    tokens = built["refs"][0]["tokens"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    ft = tmp_path / "ft"
    model.save_pretrained(str(ft))
    assert (
        not (ft / "mtp").exists()
        and json.loads((ft / "config.json").read_text()).get("num_nextn_predict_layers", 0) == 0
    )
    before = {p.name: p.read_bytes() for p in ft.glob("*.safetensors")}
    summary = attach_heads(str(ft), str(export))
    assert summary["layout"] == "sidecar" and summary["num_heads"] == 2
    assert _files(ft)["mtp/model-00001-of-00001.safetensors"] == _files(export)["mtp/model-00001-of-00001.safetensors"]
    assert {k: v for k, v in _files(ft).items() if k.startswith("mtp/")} == {
        k: v for k, v in _files(export).items() if k.startswith("mtp/")
    }
    assert {p.name: p.read_bytes() for p in ft.glob("*.safetensors")} == before  # the fine-tune itself untouched
    from_ckpt = tmp_path / "ft_from_ckpt"
    attach_heads(str(ft), str(built["root"] / f"ck_{name}"), str(from_ckpt), overwrite=True)
    from safetensors.torch import load_file

    ours = load_file(str(from_ckpt / "mtp" / "model-00001-of-00001.safetensors"))
    theirs = load_file(str(export / "mtp" / "model-00001-of-00001.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    inline = tmp_path / "ft_inline"  # for vLLM / SGLang: the heads in the main files, declared in config.json
    attach_heads(str(ft), str(export), str(inline), mtp="inline")
    assert json.loads((inline / "config.json").read_text())["num_nextn_predict_layers"] == 2
    assert _keys(inline) == _keys(ft) | set(theirs) and not (inline / "mtp").exists()
    attached = load_file(str(inline / "model-mtp-heads.safetensors"))
    assert attached.keys() == theirs.keys() and all(torch.equal(attached[n], theirs[n]) for n in theirs)
    prompt = tokens[:1, :5]
    for path in (ft, inline):
        tuned = _load(path)
        enable_mtp(tuned)  # from where it was loaded: the fine-tune with its re-attached heads
        ref = tuned.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(tuned.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True), ref)


def test_attach_errors(built, tmp_path, capsys):
    """attach_mtp_heads: one line `attach_mtp_heads.py: error: ...`, exit 2, nothing written."""
    from mtpd_megatron.convert.mtp_heads import cli

    root = built["root"]
    ft = tmp_path / "ft"
    shutil.copytree(root / "hf_dense_none", ft)
    snapshot = sorted(str(p.relative_to(ft)) for p in ft.rglob("*"))

    def fails(argv, needle):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("attach_mtp_heads.py: error: ") and needle in err, err
        assert sorted(str(p.relative_to(ft)) for p in ft.rglob("*")) == snapshot
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))

    fails(["--model", str(ft), "--heads", str(root / "hf_moe")], "a qwen3 model, the heads belong to a glm4_moe")
    fails(["--model", str(ft), "--heads", str(tmp_path / "nope")], "no such directory")
    fails(["--model", str(ft), "--heads", str(root / "hf_dense_none")], "has no MTP heads")
    fails(["--model", str(ft), "--heads", str(root / "hf_dense"), "--mtp", "inline"], "pass --out")
    fails(
        ["--model", str(root / "hf_moe_inline"), "--heads", str(root / "hf_moe"), "--out", str(tmp_path / "out")],
        "already holds 2 inline MTP heads",
    )
    resized = tmp_path / "resized"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ft))
    model.resize_token_embeddings(640)
    model.save_pretrained(str(resized))
    assert cli(["--model", str(resized), "--heads", str(root / "hf_dense")]) == 2
    err = capsys.readouterr().err
    assert "vocab mismatch" in err and "640 embedding rows" in err and not (resized / "mtp").exists()
    wide = tmp_path / "wide"  # same vocabulary, another layer count
    conf = json.loads((ft / "config.json").read_text())
    shutil.copytree(ft, wide)
    (wide / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 3}))
    assert cli(["--model", str(wide), "--heads", str(root / "hf_dense")]) == 2
    assert "3 decoder layers, the heads follow a 2-layer model" in capsys.readouterr().err
    # heads already there: refused without --overwrite
    assert cli(["--model", str(ft), "--heads", str(root / "hf_dense")]) == 0
    capsys.readouterr()
    snapshot = sorted(str(p.relative_to(ft)) for p in ft.rglob("*"))
    fails(["--model", str(ft), "--heads", str(root / "hf_dense")], "pass --overwrite")


def test_layout_choice():
    """auto = inline exactly where the installed transformers class declares the heads' layers as MTP layers
    (Glm4Moe: layers 46 and 92, one head); sidecar everywhere else (our presets: 28 and 24 layers, 4 heads)."""
    from mtpd_megatron.convert.mapping import ARCHS
    from mtpd_megatron.convert.mtp_heads import choose_layout, config_fields

    assert choose_layout(ARCHS["glm4_moe"], 46, 1) == choose_layout(ARCHS["glm4_moe"], 92, 1) == "inline"
    assert choose_layout(ARCHS["glm4_moe"], 46, 2) == choose_layout(ARCHS["glm4_moe"], 24, 4) == "sidecar"
    assert choose_layout(ARCHS["qwen3"], 28, 4) == choose_layout(ARCHS["llama"], 61, 1) == "sidecar"
    assert choose_layout(ARCHS["qwen3"], 28, 0) == "none" and choose_layout(ARCHS["qwen3"], 28, 4, "inline") == "inline"
    assert config_fields(ARCHS["qwen3"], "inline", 4, 28) == {
        "num_nextn_predict_layers": 4,
        "num_mtp_layers": 4,
        "mtp_layer_types": ["full_attention"] * 4,
    }
    assert config_fields(ARCHS["glm4_moe"], "sidecar", 4, 24) == {"num_nextn_predict_layers": 0}


def test_inline_where_transformers_declares_the_heads(variants):
    """A GLM-4.5-Air-shaped export (46 layers, one head) goes inline by default, and then stock transformers alone
    loads it with an empty report and drafts with `generate(use_mtp=True)` (its own MtpModel.from_pretrained)."""
    from transformers import AutoModelForCausalLM

    root, res = variants
    assert res["glm46"]["mtp_layout"] == "inline" and not (root / "hf_glm46" / "mtp").exists()
    model, info = AutoModelForCausalLM.from_pretrained(
        str(root / "hf_glm46"), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    prompt = res["tokens"][:1, :5]
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True), ref)


def test_shipped_generate(built, tmp_path):
    """Without this package: the export's own custom_generate/generate.py (transformers' hook, trust_remote_code)
    drafts with every head (or the first one) and equals greedy, for re-attached sidecar heads and inline heads."""
    from mtpd_megatron.convert.mtp_heads import attach_heads

    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "for path in sys.argv[1:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)\n"
        "    p = torch.tensor([[5, 9, 33, 7, 21]])\n"
        "    ref = m.generate(p, max_new_tokens=16, do_sample=False)\n"
        "    for heads in (None, 1):\n"
        "        out = m.generate(p, max_new_tokens=16, do_sample=False, custom_generate=path, trust_remote_code=True,\n"
        "                         num_mtp_heads=heads)\n"
        "        assert torch.equal(out, ref), (path, out, ref)\n"
        "assert not any(m.startswith('mtpd_megatron') for m in sys.modules)\n"
        "print('ok', sys.modules['transformers'].__version__)\n"
    )
    ft = tmp_path / "ft"
    shutil.copytree(built["root"] / "hf_dense_none", ft)
    attach_heads(str(ft), str(built["root"] / "hf_dense"))
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "",
    }  # the export's own code only: no mtpd_megatron on the path
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ft), str(built["root"] / "hf_moe_inline")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no output directory left behind
# ----------------------------------------------------------------------------------------------------------


def _fails(capsys, cli, argv, out: Path, needle: str):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.match(r"^convert_(to|from)_hf\.py: error: ", err) and needle in err, err
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))


def test_errors(built, tmp_path, capsys):
    from mtpd_megatron.convert.from_hf import cli as from_cli
    from mtpd_megatron.convert.to_hf import cli as to_cli

    root = built["root"]
    out = tmp_path / "out"
    # to_hf: missing checkpoint, truncated shard, vocabulary mismatch with the tokenizer
    _fails(capsys, to_cli, ["--ckpt", str(tmp_path / "nope"), "--out", str(out)], out, "no such directory")
    trunc = tmp_path / "ck_trunc"
    shutil.copytree(root / "ck_dense", trunc)
    shard = next((trunc / "iter_0000005").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    _fails(capsys, to_cli, ["--ckpt", str(trunc), "--out", str(out)], out, "truncated")
    from mtpd_megatron.data.tokenizer import train_bpe

    other = tmp_path / "other_tok"
    other.mkdir()
    train_bpe(["a b c"] * 10, vocab_size=270).save(str(other / "tokenizer.json"))
    _fails(
        capsys,
        to_cli,
        ["--ckpt", str(root / "ck_dense"), "--out", str(out), "--tokenizer", str(other)],
        out,
        "vocab mismatch",
    )
    # from_hf: missing shard, truncated safetensors, wrong architecture (model_type and --config), vocab mismatch
    sharded = tmp_path / "hf_sharded"
    shutil.copytree(root / "hf_moe_sharded", sharded)
    files = sorted(sharded.glob("model-*.safetensors"))
    files[1].unlink()
    _fails(capsys, from_cli, ["--hf", str(sharded), "--out", str(out)], out, "missing")
    shutil.copytree(root / "hf_moe_sharded", tmp_path / "hf_trunc")
    f = sorted((tmp_path / "hf_trunc").glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-100])
    _fails(capsys, from_cli, ["--hf", str(tmp_path / "hf_trunc"), "--out", str(out)], out, "truncated")
    wrong = tmp_path / "hf_wrong"
    shutil.copytree(root / "hf_dense", wrong)
    conf = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**conf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _fails(capsys, from_cli, ["--hf", str(wrong), "--out", str(out)], out, "wrong architecture")
    cfg_path = tmp_path / "wide.yaml"
    cfg_path.write_text(json.dumps({"model": {**TINY, "hidden_size": 128}}))
    _fails(
        capsys,
        from_cli,
        ["--hf", str(root / "hf_dense"), "--out", str(out), "--config", str(cfg_path)],
        out,
        "wrong architecture",
    )
    cfg_path.write_text(json.dumps({"model": {**TINY, "vocab_size": 1000}, "mtp": {"num_heads": 2}}))
    _fails(
        capsys,
        from_cli,
        ["--hf", str(root / "hf_dense"), "--out", str(out), "--config", str(cfg_path)],
        out,
        "vocab mismatch",
    )
    # refusing what no class expresses (softmax router + shared expert)
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.convert import ConvertError
    from mtpd_megatron.convert.mapping import choose_arch

    with pytest.raises(ConvertError, match="shared expert"):
        choose_arch(config_from_dict({"model": {**TINY, "moe": {"num_experts": 4, "shared_expert_hidden_size": 64}}}))
    # a tensor missing inside an otherwise valid file: raised after the output directory was started
    assert "lacks model.layers.1.mlp.down_proj.weight" in built["errors"]["missing_tensor"]
    assert not (root / "ck_from_missing").exists() and not list(root.glob("ck_from_missing.tmp-*"))


def test_cli_exit_code(built, tmp_path):
    """The real tool: exit status 2 and a single stderr line."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--ckpt", str(tmp_path / "none"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and not out.exists()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "attach_mtp_heads.py"),
            "--model",
            str(tmp_path / "none"),
            "--heads",
            str(built["root"] / "hf_dense"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("attach_mtp_heads.py: error: --model ") and "no such directory" in proc.stderr


def test_nonfinite_weights_are_refused_unless_allowed(built, tmp_path, capsys):
    """Both directions refuse NaN/inf tensors in one line (a diverged model converts into a useless one
    that loads without complaint); --allow-nonfinite converts anyway."""
    from safetensors.torch import load_file, save_file

    from mtpd_megatron.convert.from_hf import cli as from_cli
    from mtpd_megatron.convert.to_hf import cli as to_cli

    hf = shutil.copytree(built["root"] / "hf_dense", tmp_path / "hf_nan")
    shard = sorted(hf.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(k for k in sorted(tensors) if k.endswith("mlp.down_proj.weight"))
    tensors[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "ck"
    _fails(capsys, from_cli, ["--hf", str(hf), "--out", str(out)], out, f"{name} in {shard.name} has 3 non-finite")
    assert from_cli(["--hf", str(hf), "--out", str(out), "--allow-nonfinite"]) == 0
    capsys.readouterr()
    back = tmp_path / "hf_back"
    _fails(capsys, to_cli, ["--ckpt", str(out), "--out", str(back)], back, "non-finite value(s)")
    assert to_cli(["--ckpt", str(out), "--out", str(back), "--allow-nonfinite"]) == 0


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    from mtpd_megatron.convert.from_hf import cli as from_cli
    from mtpd_megatron.convert.to_hf import cli as to_cli

    for tool, cli, args in (
        ("convert_to_hf.py", to_cli, ["--ckpt", str(tmp_path)]),
        ("convert_from_hf.py", from_cli, ["--hf", str(tmp_path)]),
    ):
        with pytest.raises(SystemExit) as stop:
            cli(args)
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"{tool}: error: the following arguments are required: --out (see {tool} --help)"
        ]
    # a runtime error of the importer: its line, without megatron's import-time TE/Apex warnings before it
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_from_hf.py"),
            "--hf",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"convert_from_hf.py: error: --hf {tmp_path / 'nope'}: no such directory"
    ], proc.stderr
