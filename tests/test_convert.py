"""Checkpoint conversion megatron torch_dist <-> Hugging Face (mtpd_megatron/convert).

One module-scoped build does the expensive parts once:
  1. two gloo ranks build the tiny dense model at TP2 and the tiny MoE model at TP2/EP2/SP (4 MTP heads each
     in the presets; 2 here), perturb every weight (expert bias included) identically on replicas, record
     megatron's logits (main + every MTP depth) and save torch_dist checkpoints in the manager's layout;
  2. one process converts: ckpt -> HF, HF -> ckpt (--tp 2 --ep 2), ckpt -> HF again, plus variants.
The tests then load the HF directories with stock transformers (no remote code) and compare.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from mtpd_megatron.testing.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
SEQ = 16

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
            qk_layernorm=True, max_position_embeddings=64, rotary_base=10000)
DENSE = {"model": TINY, "parallel": {"tensor_model_parallel_size": 2}, "mtp": {"num_heads": 2}}
MOE = {  # configs/tiny_moe.yaml's architecture
    "model": {**TINY, "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 64,
                              "shared_expert_hidden_size": 64, "layer_freq": [0, 1], "score_function": "sigmoid",
                              "expert_bias": True, "load_balancing_type": "none"}},
    "parallel": {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
                 "sequence_parallel": True},
    "mtp": {"num_heads": 2},
}
# Single-process variants for the other mapping tables (TP1): every class mapping.py can choose.
_SMALL_MOE = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 48}
VARIANTS = {
    "llama": {"model": {**TINY, "qk_layernorm": False, "tie_embeddings": True}, "mtp": {"num_heads": 1}},
    "qwen3_moe": {"model": {**TINY, "moe": {**_SMALL_MOE, "layer_freq": [1, 0], "score_function": "softmax"}},
                  "mtp": {"num_heads": 1}},
    "mixtral": {"model": {**TINY, "qk_layernorm": False, "moe": {**_SMALL_MOE, "score_function": "softmax"}},
                "mtp": {"num_heads": 1}},
    "glm4_moe": {"model": {**TINY, "qk_layernorm": False,
                           "moe": {**_SMALL_MOE, "router_topk": 1, "score_function": "sigmoid"}},
                 "mtp": {"num_heads": 1}},
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
        lambda m, i, o: captured.append(o[0].detach().transpose(0, 1).clone()))
    with torch.no_grad():
        model(tokens, pos, None, labels=torch.roll(tokens, -1, 1))
    hook.remove()
    # process_mtp_loss runs the shared head per depth, then the main head (clone: the CE works in place)
    return captured[-1], captured[:-1]


def _make_checkpoints(root: str, vocab: int, tokenizer: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.convert.from_hf import checkpoint_meta, save_model_checkpoint
    from mtpd_megatron.model.builder import build_model, padded_vocab_size
    from mtpd_megatron.parallel import cpu_compat

    cpu_compat.enable()
    out = {}
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for name, raw in (("dense", DENSE), ("moe", MOE)):
        p = raw["parallel"]
        ps.initialize_model_parallel(tensor_model_parallel_size=p["tensor_model_parallel_size"],
                                     expert_model_parallel_size=p.get("expert_model_parallel_size", 1),
                                     expert_tensor_parallel_size=p.get("expert_tensor_parallel_size"))
        model_parallel_cuda_manual_seed(7)
        cfg = config_from_dict({**raw, "model": {**raw["model"], "vocab_size": vocab},
                                "data": {"tokenizer": tokenizer}})
        padded = padded_vocab_size(vocab, 128, p["tensor_model_parallel_size"])
        model = build_model(cfg, vocab_size=padded)
        _perturb(model)
        model.eval()
        main, mtp = _megatron_logits(model, tokens)
        meta = checkpoint_meta(cfg, iteration=5, vocab_size=vocab, padded_vocab_size=padded, stage="test")
        save_model_checkpoint(model, Path(root) / f"ck_{name}", meta)
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
    from mtpd_megatron.config import config_from_dict
    from mtpd_megatron.convert.from_hf import checkpoint_meta, save_model_checkpoint
    from mtpd_megatron.model.builder import build_model
    from mtpd_megatron.parallel import cpu_compat

    cpu_compat.enable()
    r = Path(root)
    out = {}
    pp2 = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    for name, parallel in (("moe", {}), ("dense", pp2)):
        ckpt = r / f"rt_ck_{name}" / "iter_0000000"
        meta = layout.read_meta(ckpt)
        raw = meta["config"]
        cfg = config_from_dict({**raw, "parallel": {**raw["parallel"], **parallel}})
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                                     expert_model_parallel_size=p.expert_model_parallel_size,
                                     expert_tensor_parallel_size=p.expert_tensor_parallel_size)
        model_parallel_cuda_manual_seed(1)
        # optimizer_scope maps Tensor.cuda() to CPU: with PP and MTP the last stage's embedding copy is synced
        # through language_module.py:307 `weight.data.cuda()`, which cpu_compat does not patch otherwise.
        with cpu_compat.optimizer_scope():
            model = build_model(cfg, vocab_size=meta["padded_vocab_size"])
        sd = {"model": model.sharded_state_dict(metadata=sharded_metadata())}
        model.load_state_dict(dist_checkpointing.load(sd, str(ckpt))["model"], strict=True)
        if name == "moe":
            model.eval()
            out["moe"] = _megatron_logits(model, tokens)[0]
        else:
            save_model_checkpoint(model, r / "ck_dense_pp2", checkpoint_meta(
                cfg, iteration=1, vocab_size=meta["vocab_size"], padded_vocab_size=meta["padded_vocab_size"],
                stage="test"))
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
            summary = write_hf(cfg, lambda names: {n: sd[n] for n in names}, hf, vocab_rows=256,
                               dtype=torch.float32, progress=False)
        convert_from_hf(str(hf), str(Path(root) / f"ck_{name}"), progress=False)
        convert_to_hf(str(Path(root) / f"ck_{name}"), str(Path(root) / f"rt_hf_{name}"), progress=False)
        # a directory written by transformers itself (its config.json spelling, no MTP heads) imports too
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(hf)))
        fresh.save_pretrained(str(Path(root) / f"fresh_{name}"))
        convert_from_hf(str(Path(root) / f"fresh_{name}"), str(Path(root) / f"ck_fresh_{name}"), mtp="none",
                        progress=False)
        convert_to_hf(str(Path(root) / f"ck_fresh_{name}"), str(Path(root) / f"rt_fresh_{name}"), progress=False)
        out[name] = {"main": main, "mtp": mtp, "arch": summary["arch"]}
    out["tokens"] = tokens
    return out


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


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
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


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
    """The exported DeepSeek-layout heads, run by hf_mtp_decoder, give megatron's per-depth logits."""
    from mtpd_megatron.convert.hf_mtp_decoder import HFMTPDecoder

    dec = HFMTPDecoder.from_pretrained(built["root"] / f"hf_{name}")
    assert len(dec.heads) == 2
    tokens = built["refs"][0]["tokens"]
    ours = dec.mtp_logits(tokens)
    for k, ref in enumerate(_gathered(built["refs"], name, "mtp")):
        valid = SEQ - (k + 1)  # megatron zero-fills the rolled-in tokens at the end
        assert _rel(ours[k][:, :valid], ref[:, :valid]) <= 1e-4, f"depth {k + 1}"


def test_round_trip_bitwise(built):
    """HF -> megatron (saved for TP2/EP2) -> HF reproduces every byte of the weights, MTP heads included."""
    root = built["root"]
    for name in ("dense", "moe"):
        a, b = _files(root / f"hf_{name}"), _files(root / f"rt_hf_{name}")
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), name
        config = (root / f"hf_{name}" / "config.json").read_bytes()
        assert config == (root / f"rt_hf_{name}" / "config.json").read_bytes()
        keys = json.loads((root / f"hf_{name}" / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(k.startswith("model.layers.3.eh_proj") for k in keys)  # 2 layers + 2 heads
    meta = json.loads((root / "rt_ck_moe" / "iter_0000000" / "mtpd_checkpoint.json").read_text())
    assert meta["vocab_size"] == built["vocab"] and meta["padded_vocab_size"] == 512
    assert meta["config"]["parallel"]["expert_model_parallel_size"] == 2
    assert (root / "rt_ck_moe" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"


def test_import_loads_at_other_layouts(built, tmp_path):
    """The TP1-saved import loads at TP2/EP2/SP with megatron's resharding (same logits as the original), and a
    PP2 re-save of the dense import converts back (tool CLI) to the very same HF weights."""
    ref = _gathered(built["refs"], "moe", "main")
    assert _rel(torch.cat([r["moe"] for r in built["reloaded"]], dim=-1), ref) <= 1e-5
    out = tmp_path / "hf_from_pp2"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--ckpt",
                           str(built["root"] / "ck_dense_pp2"), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _files(out) == _files(built["root"] / "hf_dense")
    assert (out / "config.json").read_bytes() == (built["root"] / "hf_dense" / "config.json").read_bytes()


def test_checkpoint_metadata_matches_manager(built):
    """The imported checkpoint passes the CheckpointManager's own verification and compatibility check."""
    from mtpd_megatron.checkpoint import layout
    from mtpd_megatron.checkpoint.manager import check_compatible
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
    assert _files(root / "hf_moe_sharded").keys() == set(files)
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
    init = json.loads((root / "hf_dense_init" / "config.json").read_text())
    assert init["num_nextn_predict_layers"] == 3
    from safetensors import safe_open

    with safe_open(str(root / "hf_dense_init" / "model-00001-of-00001.safetensors"), "pt") as f, \
            safe_open(str(root / "hf_dense" / "model-00001-of-00001.safetensors"), "pt") as g:
        for name, same in (("model.layers.1.mlp.down_proj.weight", True), ("model.layers.2.eh_proj.weight", False)):
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)) == same, name
        assert torch.all(f.get_tensor("model.layers.4.enorm.weight") == 1)


def test_other_architectures(variants):
    """Llama (tied), Qwen3-MoE (dense layer in the pattern), Mixtral and GLM (top-1, no shared expert): logits
    equal, the key layout equals what transformers' own save_pretrained writes, and a round trip is bitwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mtpd_megatron.convert.hf_mtp_decoder import HFMTPDecoder, load_heads

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
        for k, file in index.items():
            if not k.startswith("model.layers.2."):  # the MTP head (transformers does not know it)
                with safe_open(str(root / f"hf_{name}" / file), "pt") as f:
                    ours[k] = tuple(f.get_slice(k).get_shape())
        assert ours == theirs, name
        assert _files(root / f"hf_{name}") == _files(root / f"rt_hf_{name}"), name
        back = {}
        for file in (root / f"rt_fresh_{name}").glob("*.safetensors"):
            back.update(load_file(str(file)))
        assert back.keys() == fresh.keys() and all(torch.equal(back[k], fresh[k]) for k in fresh), name
        dec = HFMTPDecoder(model, load_heads(model, root / f"hf_{name}"))
        assert _rel(dec.mtp_logits(res["tokens"])[0][:, :-1], res[name]["mtp"][0][:, :-1]) <= 1e-4, name


# ----------------------------------------------------------------------------------------------------------
# HF-side MTP decoding
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_mtp_decoder_equals_generate(built, name):
    from mtpd_megatron.convert.hf_mtp_decoder import HFMTPDecoder

    dec = HFMTPDecoder.from_pretrained(built["root"] / f"hf_{name}")
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        prompt = torch.randint(2, built["vocab"], (1, 5), generator=gen)
        ref = dec.model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=1)[0].tolist()
        res = dec.generate(prompt, 24)
        assert res.tokens == ref
        assert res.steps >= 1 and res.drafted > 0
        # the heads' incremental caches give the drafts a cache-free recomputation gives
        assert dec.generate(prompt, 24, full_recompute=True).drafts == res.drafts

        def oracle(seq, k):  # the true continuation with every third step's second draft wrong
            d = (ref[len(seq): len(seq) + k] + [0] * k)[:k]
            if len(seq) % 3 == 0 and k > 1:
                d[1] = (d[1] + 1) % built["vocab"]
            return d

        res = dec.generate(prompt, 24, drafter=oracle)
        assert res.tokens == ref and res.accepted > 0 and res.accepted < res.drafted
    # EOS: stop right after the first EOS, as generate does
    eos = ref[8]
    stop = dec.model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=1)[0].tolist()
    assert dec.generate(prompt, 24, eos_token_id=eos).tokens == stop


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no output directory left behind
# ----------------------------------------------------------------------------------------------------------


def _fails(capsys, cli, argv, out: Path, needle: str):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and needle in err, err
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
    _fails(capsys, to_cli, ["--ckpt", str(root / "ck_dense"), "--out", str(out), "--tokenizer", str(other)], out,
           "vocab mismatch")
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
    _fails(capsys, from_cli, ["--hf", str(root / "hf_dense"), "--out", str(out), "--config", str(cfg_path)], out,
           "wrong architecture")
    cfg_path.write_text(json.dumps({"model": {**TINY, "vocab_size": 1000}, "mtp": {"num_heads": 2}}))
    _fails(capsys, from_cli, ["--hf", str(root / "hf_dense"), "--out", str(out), "--config", str(cfg_path)], out,
           "vocab mismatch")
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
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--ckpt", str(tmp_path / "none"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and not out.exists()


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

    for tool, cli, args in (("convert_to_hf.py", to_cli, ["--ckpt", str(tmp_path)]),
                            ("convert_from_hf.py", from_cli, ["--hf", str(tmp_path)])):
        with pytest.raises(SystemExit) as stop:
            cli(args)
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"{tool}: error: the following arguments are required: --out (see --help)"]
    # a runtime error of the importer: its line, without megatron's import-time TE/Apex warnings before it
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_from_hf.py"), "--hf", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --hf {tmp_path / 'nope'}: no such directory"], proc.stderr
