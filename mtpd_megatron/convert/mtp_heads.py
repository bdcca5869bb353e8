"""Where an export keeps its MTP heads, and putting them back after a Hugging Face fine-tune.

Layouts (`--mtp` of tools/convert_to_hf.py; the tensor names are the DeepSeek-V3 ones either way, mapping.py):

* sidecar: the main weight files hold exactly the stock class's keys, so every loader that knows the class
  loads them, strict ones included (vLLM's Qwen3 loader raises on any extra `model.layers.{L}.*` tensor, and
  transformers prints a load report flagging them). The heads are in `mtp/`: `model-*.safetensors` +
  `model.safetensors.index.json` with the `model.layers.{L+k}.*` tensors and `mtp_heads.json`, the manifest
  that says what they are (FORMAT, count, the model they belong to, vocabulary, the formula). config.json
  declares no heads (GLM: num_nextn_predict_layers 0), so it stays true after any HF fine-tune, which keeps the
  stock keys only.
* inline: the heads in the main files as `model.layers.{L+k}.*` and declared in config.json
  (num_nextn_predict_layers, and transformers' num_mtp_layers / mtp_layer_types): what vLLM's and SGLang's
  DeepSeek/GLM MTP loaders read from the target model's own directory.
* none: no heads.

`auto` (the default) is inline exactly when the installed transformers class already declares every head's
tensors as its MTP layers (`_keys_to_ignore_on_load_unexpected`, the patterns transformers' MtpModel also uses
to find them): then the stock loader, stock `generate(use_mtp=True)` and the engines all agree on inline (GLM-4.5
shapes: 46 or 92 layers, one head). Anything else is sidecar: Qwen3/Llama/Qwen3-MoE/Mixtral declare no MTP
layers, and Glm4Moe declares layers 46 and 92 only, so our 24-layer, 4-head MoE preset's heads would be
"unexpected" keys for transformers. `--mtp inline` remains the choice for serving GLM MTP with vLLM / SGLang
(docs/serving.md).

Either way the export ships `custom_generate/generate.py` (a copy of inference/hf_mtp.py) when it has heads:
transformers' hook for a generation method shipped with a model, which drafts with all heads through
transformers' own MTP code.

`attach_heads` (tools/attach_mtp_heads.py): a fine-tune through transformers (`from_pretrained` ->
`save_pretrained`) keeps only the stock keys, so the heads are gone; this puts a checkpoint's or an export's
heads back, bitwise, after checking that they fit (same class, layer count, hidden size, vocabulary rows and
tokenizer, every tensor's shape against the model's last decoder layer, which the head's inner layer mirrors).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from mtpd_megatron.convert import ConvertError, atomic_output_dir, mapping
from mtpd_megatron.inference import hf_mtp
from mtpd_megatron.inference.hf_mtp import FORMAT, LAYOUT, MANIFEST, SIDECAR_DIR

LAYOUTS = ("auto", "sidecar", "inline", "none")
GENERATE_FILE = Path("custom_generate") / "generate.py"
INLINE_SHARD = "model-mtp-heads.safetensors"  # attach --mtp inline: the heads' own file next to the main shards
HEAD_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
SHARED_COPIES = ("shared_head.head.weight", "embed_tokens.weight")  # DeepSeek files may repeat these: dropped


# ---------------------------------------------------------------------------------------------------------
# Choosing and describing the layout
# ---------------------------------------------------------------------------------------------------------


def stock_declares_heads(arch: mapping.HFArch, num_layers: int, num_heads: int) -> bool:
    """Whether the installed transformers class of `arch` declares the tensors of heads L..L+K-1 as MTP layers."""
    import transformers

    cls = getattr(transformers, arch.architecture)
    patterns = [re.compile(p) for p in (getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])]
    if not patterns or not num_heads:
        return False
    for k in range(num_heads):
        name = f"model.layers.{num_layers + k}.eh_proj.weight"
        if not any(p.search(name) for p in patterns):
            return False
    return True


def choose_layout(arch: mapping.HFArch, num_layers: int, num_heads: int, requested: str = "auto") -> str:
    if requested not in LAYOUTS:
        raise ConvertError(f"--mtp {requested}: choose one of {', '.join(LAYOUTS)}")
    if not num_heads:
        return "none"
    if requested != "auto":
        return requested
    return "inline" if stock_declares_heads(arch, num_layers, num_heads) else "sidecar"


def config_fields(arch: mapping.HFArch, layout: str, num_heads: int, num_layers: int) -> dict:
    """config.json fields that declare the heads: present for inline heads only (the file describes the main
    weight files; sidecar heads are described by their manifest)."""
    if layout != "inline":
        return {"num_nextn_predict_layers": 0} if arch.name == "glm4_moe" else {}
    fields = {"num_nextn_predict_layers": num_heads}
    if arch.name != "glm4_moe":  # Glm4MoeConfig maps num_mtp_layers onto num_nextn_predict_layers itself
        fields["num_mtp_layers"] = num_heads
    if arch.name in ("qwen3", "qwen3_moe"):  # classes with layer_types: transformers' get_mtp_config needs these
        fields["mtp_layer_types"] = ["full_attention"] * num_heads
    return fields


def vocab_fingerprint(tokenizer_json: Optional[Path]) -> Optional[str]:
    """sha256 of a tokenizer's token -> id map (added tokens included); None without a readable tokenizer.json."""
    if tokenizer_json is None or not Path(tokenizer_json).is_file():
        return None
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer just cannot be compared
        return None
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def manifest(
    arch: mapping.HFArch,
    *,
    num_heads: int,
    num_layers: int,
    hidden: int,
    vocab_rows: int,
    vocab_size: Optional[int],
    dtype: torch.dtype,
    vocab_sha256: Optional[str],
) -> dict:
    """mtp/mtp_heads.json: everything needed to use or re-attach the heads without the rest of the export."""
    return {
        "format": FORMAT,
        "num_heads": num_heads,
        "num_hidden_layers": num_layers,
        "architecture": arch.architecture,
        "model_type": arch.name,
        "hidden_size": hidden,
        "vocab_size": vocab_rows,
        "unpadded_vocab_size": vocab_size,
        "tokenizer_vocab_sha256": vocab_sha256,
        "dtype": str(dtype).replace("torch.", ""),
        "layout": LAYOUT,
        "transformers_config": {"num_mtp_layers": num_heads},
        "use": "transformers: model.generate(ids, custom_generate=EXPORT, trust_remote_code=True) drafts with every "
        "head (custom_generate/generate.py); see docs/serving.md",
    }


def write_manifest(directory: Path, data: dict) -> None:
    with open(directory / MANIFEST, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def ship_generate(out: Path) -> None:
    """Copy inference/hf_mtp.py to OUT/custom_generate/generate.py (transformers' custom_generate hook)."""
    (out / GENERATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_mtp.__file__, out / GENERATE_FILE)


# ---------------------------------------------------------------------------------------------------------
# Reading heads (an export's, or a checkpoint's) and checking that they fit a model
# ---------------------------------------------------------------------------------------------------------


def _export_heads(src: Path) -> dict:
    """An HF export's heads: {'tensors', 'num_layers', 'vocab_rows', 'arch', 'manifest', 'vocab_sha256'}."""
    from safetensors import safe_open

    try:
        heads = hf_mtp.locate_heads(src)
    except hf_mtp.MTPHeadsError as e:
        raise ConvertError(f"--heads {e}") from None
    if not heads["num_heads"]:
        raise ConvertError(
            f"--heads {src}: it has no MTP heads (no {SIDECAR_DIR}/{MANIFEST}, config.json declares "
            f"none); pass the training checkpoint instead"
        )
    conf = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    man = heads["manifest"] or {}
    tensors = {}
    for file in sorted(set(heads["files"].values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in heads["files"] and not name.endswith(SHARED_COPIES):
                    tensors[name] = f.get_tensor(name)
    model_type = man.get("model_type") or conf.get("model_type")
    if model_type not in mapping.ARCHS:
        raise ConvertError(f"--heads {src}: model_type {model_type!r} is not one of {', '.join(mapping.ARCHS)}")
    return {
        "tensors": tensors,
        "num_heads": heads["num_heads"],
        "num_layers": heads["num_hidden_layers"],
        "vocab_rows": man.get("vocab_size") or conf.get("vocab_size"),
        "vocab_size": man.get("unpadded_vocab_size"),
        "arch": mapping.ARCHS[model_type],
        "manifest": heads["manifest"],
        "dtype": man.get("dtype"),
        "vocab_sha256": man.get("tokenizer_vocab_sha256") or vocab_fingerprint(src / "tokenizer.json"),
    }


def _checkpoint_heads(ckpt: Path, iteration: Optional[int]) -> dict:
    from mtpd_megatron.convert.to_hf import read_checkpoint_heads

    got = read_checkpoint_heads(str(ckpt), iteration)
    return {**got, "manifest": None}


def read_source(heads: str, iteration: Optional[int] = None) -> dict:
    src = Path(heads)
    if not src.is_dir():
        raise ConvertError(f"--heads {src}: no such directory (pass an export with MTP heads or a checkpoint)")
    if (src / "config.json").is_file() or (src / SIDECAR_DIR / MANIFEST).is_file():
        if iteration is not None:
            raise ConvertError("--iteration applies to a checkpoint --heads, not to an HF export")
        return _export_heads(src)
    from mtpd_megatron.checkpoint import layout

    if (
        layout.iteration_of(src) is not None
        or (src / layout.TRACKER_FILE).is_file()
        or layout.complete_checkpoints(src)
    ):
        return _checkpoint_heads(src, iteration)
    raise ConvertError(f"--heads {src}: neither a Hugging Face export (config.json) nor a checkpoint (iter_XXXXXXX)")


def check_fit(source: dict, target: Path, conf: dict, info: dict) -> None:
    """One-line ConvertError unless the heads in `source` fit the model at `target` (config `conf`, tensor
    shapes `info` from its safetensors headers)."""
    arch = source["arch"]
    if conf.get("model_type") != arch.name:
        raise ConvertError(
            f"--model {target}: a {conf.get('model_type')} model, the heads belong to a {arch.name} "
            f"({arch.architecture}); pass the model they were trained with"
        )
    L = conf.get("num_hidden_layers")
    if L != source["num_layers"]:
        raise ConvertError(
            f"--model {target}: {L} decoder layers, the heads follow a {source['num_layers']}-layer "
            f"model (their input is that model's last hidden state)"
        )
    emb = info.get("model.embed_tokens.weight")
    rows = emb[1][0] if emb else conf.get("vocab_size")
    hidden = conf.get("hidden_size")
    if rows != source["vocab_rows"] or conf.get("vocab_size") != rows:
        raise ConvertError(
            f"vocab mismatch: --model {target} has {rows} embedding rows (config.json vocab_size "
            f"{conf.get('vocab_size')}), the heads were trained with {source['vocab_rows']} (a resized "
            f"vocabulary changes what the shared LM head means to them)"
        )
    ours = vocab_fingerprint(target / "tokenizer.json")
    if ours and source.get("vocab_sha256") and ours != source["vocab_sha256"]:
        raise ConvertError(
            f"vocab mismatch: {target / 'tokenizer.json'} maps tokens to ids differently from the "
            f"tokenizer the heads were trained with (pass the model fine-tuned from that export)"
        )
    last = f"model.layers.{L - 1}."
    layer = {n[len(last) :]: shape for n, (_, shape) in info.items() if n.startswith(last)}
    own = {
        "enorm.weight": (hidden,),
        "hnorm.weight": (hidden,),
        "eh_proj.weight": (hidden, 2 * hidden),
        "shared_head.norm.weight": (hidden,),
    }
    for k in range(source["num_heads"]):
        prefix = f"model.layers.{L + k}."
        have = {n[len(prefix) :]: tuple(t.shape) for n, t in source["tensors"].items() if n.startswith(prefix)}
        expected = {**layer, **own}
        for suffix, shape in sorted(have.items()):
            if suffix not in expected:
                raise ConvertError(
                    f"head {k + 1} tensor {prefix}{suffix} has no counterpart in --model {target}'s "
                    f"last decoder layer (a different layer structure)"
                )
            if tuple(expected[suffix]) != shape:
                raise ConvertError(
                    f"head {k + 1} tensor {prefix}{suffix} has shape {shape}, --model {target} needs "
                    f"{tuple(expected[suffix])} (a different model shape)"
                )
        lacking = sorted(set(expected) - set(have))
        if lacking:
            raise ConvertError(f"--heads: head {k + 1} lacks {prefix}{lacking[0]} ({len(lacking)} tensors missing)")


# ---------------------------------------------------------------------------------------------------------
# Attaching
# ---------------------------------------------------------------------------------------------------------


def _write_sidecar(directory: Path, source: dict, target_conf: dict, target: Path) -> None:
    from mtpd_megatron.convert.to_hf import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory)
    for name, t in source["tensors"].items():
        writer.add(name, t)
    writer.finish()
    man = source["manifest"]
    if man is None:
        arch = source["arch"]
        first = next(iter(source["tensors"].values()))
        man = manifest(
            arch,
            num_heads=source["num_heads"],
            num_layers=source["num_layers"],
            hidden=target_conf["hidden_size"],
            vocab_rows=source["vocab_rows"],
            vocab_size=source.get("vocab_size"),
            dtype=first.dtype,
            vocab_sha256=source.get("vocab_sha256"),
        )
    write_manifest(directory, man)


def _copy_model(target: Path, out: Path) -> None:
    """The fine-tuned model's files (not a previous sidecar or generate hook: those are written anew)."""
    for item in target.iterdir():
        if item.name in (SIDECAR_DIR, GENERATE_FILE.parts[0]):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)


def _inline_into(out: Path, source: dict, conf: dict) -> None:
    """Add the heads to the copy in `out` as `model.layers.{L+k}.*` in the index, declared in config.json."""
    from safetensors.torch import save_file

    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in f.keys()}}
    tensors = {n: t.contiguous() for n, t in source["tensors"].items()}
    save_file(tensors, str(out / INLINE_SHARD), metadata={"format": "pt"})
    weight_map = dict(index.get("weight_map", {}))
    weight_map.update({n: INLINE_SHARD for n in tensors})
    meta = dict(index.get("metadata") or {})
    if "total_size" in meta:
        meta["total_size"] = int(meta["total_size"]) + sum(t.numel() * t.element_size() for t in tensors.values())
    index.update(metadata=meta, weight_map=dict(sorted(weight_map.items())))
    index_path.write_text(json.dumps(index, indent=2))
    arch = source["arch"]
    conf = {**conf, **config_fields(arch, "inline", source["num_heads"], source["num_layers"])}
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))


def attach_heads(
    model_dir: str,
    heads: str,
    out: Optional[str] = None,
    *,
    mtp: str = "auto",
    iteration: Optional[int] = None,
    overwrite: bool = False,
) -> dict:
    """Attach the MTP heads of `heads` (an export or a checkpoint) to HF model `model_dir`: in place as a sidecar
    (`mtp/` appears whole or not at all), or into a new directory `out` (any layout). Returns a summary."""
    from mtpd_megatron.convert.from_hf import inspect_hf_dir

    target = Path(model_dir)
    try:
        conf, _, info = inspect_hf_dir(target)
    except ConvertError as e:
        raise ConvertError(str(e).replace("--hf ", "--model ")) from None
    existing = hf_mtp.locate_heads(target)
    if existing["layout"] == "inline":
        raise ConvertError(
            f"--model {target} already holds {existing['num_heads']} inline MTP heads in its weight "
            f"files (re-export it with --mtp sidecar, or pass a model saved by save_pretrained)"
        )
    if existing["layout"] == "sidecar" and not overwrite and out is None:
        raise ConvertError(
            f"--model {target} already has {existing['num_heads']} MTP heads in {target / SIDECAR_DIR} "
            f"(pass --overwrite to replace them)"
        )
    source = read_source(heads, iteration)
    check_fit(source, target, conf, info)
    layout = choose_layout(source["arch"], source["num_layers"], source["num_heads"], mtp)
    if layout == "none":
        raise ConvertError("--mtp none attaches nothing (choose auto, sidecar or inline)")
    if out is None:
        if layout == "inline":
            raise ConvertError(
                "--mtp inline rewrites config.json and the weight index, which cannot be done "
                "atomically in place: pass --out NEW_DIR"
            )
        from mtpd_megatron.checkpoint.atomic import atomic_dir, write_atomic

        new_hook = not (target / GENERATE_FILE).exists()
        try:
            with atomic_dir(target / SIDECAR_DIR) as tmp:
                _write_sidecar(tmp, source, conf, target)
                write_atomic(target / GENERATE_FILE, Path(hf_mtp.__file__).read_text())
        except BaseException:
            if new_hook and not (target / SIDECAR_DIR).exists():
                shutil.rmtree(target / GENERATE_FILE.parts[0], ignore_errors=True)
            raise
        where = target
    else:
        with atomic_output_dir(out, overwrite) as tmp:
            _copy_model(target, tmp)
            if layout == "sidecar":
                _write_sidecar(tmp / SIDECAR_DIR, source, conf, target)
            else:
                _inline_into(tmp, source, conf)
            ship_generate(tmp)
        where = Path(out).absolute()
    return {
        "out": str(where.absolute()),
        "layout": layout,
        "num_heads": source["num_heads"],
        "tensors": len(source["tensors"]),
        "source": str(Path(heads).absolute()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(
        "attach_mtp_heads.py",
        "Re-attach MTP heads (from a checkpoint or an export) to a Hugging Face "
        "model, e.g. after a fine-tune through transformers dropped them.",
    )
    p.add_argument("--model", required=True, help="the HF model directory to give heads (e.g. a fine-tune's output)")
    p.add_argument(
        "--heads",
        required=True,
        help="where the heads come from: an export of ours (sidecar or inline) or a torch_dist checkpoint",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write a copy of --model with the heads here (without it: add mtp/ to --model in place)",
    )
    p.add_argument(
        "--mtp",
        default="auto",
        choices=[x for x in LAYOUTS if x != "none"],
        help="layout of the attached heads (auto: as convert_to_hf.py would choose; inline needs --out)",
    )
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration for a checkpoint --heads")
    p.add_argument("--overwrite", action="store_true", help="replace existing sidecar heads / an existing --out")
    args = p.parse_args(argv)
    s = attach_heads(args.model, args.heads, args.out, mtp=args.mtp, iteration=args.iteration, overwrite=args.overwrite)
    print(
        f"attached {s['num_heads']} MTP head(s) ({s['tensors']} tensors, {s['layout']}) from {s['source']} "
        f"to {s['out']}"
    )
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.cli import run_cli

    return run_cli("attach_mtp_heads.py", main, argv)


__all__ = [
    "LAYOUTS",
    "attach_heads",
    "check_fit",
    "choose_layout",
    "config_fields",
    "manifest",
    "read_source",
    "ship_generate",
    "stock_declares_heads",
    "vocab_fingerprint",
    "write_manifest",
]
