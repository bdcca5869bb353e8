"""Hugging Face directory -> torch_dist checkpoint in the CheckpointManager's layout.

How it is saved: from ONE process with the TP1/EP1/PP1 model, through `dist_checkpointing.save` with the
manager's sharded-state-dict metadata. torch_dist stores global tensors, so the result loads at any
TP/EP/PP (megatron reshards on load); `--tp/--ep/--pp` decide only what must be fixed at save time: the
padded vocabulary (megatron pads to a multiple of make_vocab_size_divisible_by x TP) and the layout recorded
in the metadata. Nothing is launched per target rank.

Memory: the HF files are validated first (every shard present, no truncated file, the tensors the class
needs), then read tensor by tensor (`safe_open`) straight into slices of the model's parameters; the model
is allocated once (uninitialised, or initialised by megatron when `--mtp init` needs fresh heads). MTP heads
are read from wherever the export keeps them (its `mtp/` sidecar or inline, convert/mtp_heads.py).

Output: `OUT/iter_0000000/` (torch_dist files + mtpd_checkpoint.json with the config, vocabulary sizes and
megatron-core version) and `OUT/latest_checkpointed_iteration.txt`. It holds model weights only: no
optimizer state, scheduler or RNG (stage "hf_import"); the trainer starts from it like a finetune.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Optional, Sequence

import torch

from mtpd_megatron.checkpoint.metadata import HF_IMPORT_STAGE as STAGE
from mtpd_megatron.checkpoint.metadata import build_meta
from mtpd_megatron.config.load import config_from_dict, config_to_dict, load_config
from mtpd_megatron.config.schema import Config
from mtpd_megatron.convert import ConvertError, atomic_output_dir, check_finite, cli_parser, mapping, megatron_world
from mtpd_megatron.inference.hf_mtp import head_index

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MTP_SHARED_COPIES = ("shared_head.head.weight", "embed_tokens.weight")  # DeepSeek files may duplicate these


# ---------------------------------------------------------------------------------------------------------
# Validating the HF directory
# ---------------------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check that the file holds every byte it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConvertError(f"{path} is truncated (no safetensors header); re-download or re-export it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ConvertError(f"{path} is truncated (header needs {n} bytes, file has {size}); re-download it")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not a safetensors file ({e.__class__.__name__}); re-export it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise ConvertError(f"{path} is truncated ({size} bytes, header describes {8 + n + end}); re-export it")
    return header


def inspect_hf_dir(hf_dir: str | os.PathLike) -> tuple[dict, dict, dict]:
    """-> (config.json, {tensor: file}, {tensor: (dtype, shape)}) after checking every file exists and is whole."""
    root = Path(hf_dir)
    if not root.is_dir():
        raise ConvertError(f"--hf {root}: no such directory")
    try:
        hf = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"--hf {root}: no config.json (not a Hugging Face model directory)") from None
    except ValueError:
        raise ConvertError(f"{root / 'config.json'} is not valid JSON") from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise ConvertError(f"{index} is not a safetensors index (no weight_map)") from None
    elif (root / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ConvertError(f"--hf {root}: no model.safetensors(.index.json) (only safetensors files are read)")
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ConvertError(f"--hf {root}: shard {missing[0]} listed in the index is missing ({len(missing)} missing)")
    where, info = {}, {}
    for name in files:
        header = _safetensors_header(root / name)
        for key, v in header.items():
            if key == "__metadata__":
                continue
            where[key] = root / name
            info[key] = (v["dtype"], tuple(v["shape"]))
    if weight_map is not None:
        absent = [k for k, f in weight_map.items() if where.get(k) != root / f]
        if absent:
            raise ConvertError(
                f"{index}: tensor {absent[0]} is not in {weight_map[absent[0]]} (index and shards disagree)"
            )
    return hf, where, info


def inspect_heads(hf_dir: Path, hf: dict) -> tuple[int, dict, dict]:
    """-> (MTP heads in the directory, {tensor: file}, {tensor: (dtype, shape)}) for sidecar heads (`mtp/`,
    checked whole like the main files); (config.json's count, {}, {}) for inline ones or none."""
    from mtpd_megatron.inference import hf_mtp

    try:
        heads = hf_mtp.locate_heads(hf_dir)
    except hf_mtp.MTPHeadsError as e:
        raise ConvertError(str(e)) from None
    if heads["layout"] != "sidecar":
        return mapping.model_fields_from_hf(hf)[2], {}, {}
    if heads["num_hidden_layers"] != hf.get("num_hidden_layers"):
        raise ConvertError(
            f"{hf_dir / hf_mtp.SIDECAR_DIR / hf_mtp.MANIFEST}: heads of a "
            f"{heads['num_hidden_layers']}-layer model, config.json has {hf.get('num_hidden_layers')}"
        )
    where, info = {}, {}
    for path in sorted(set(heads["files"].values())):
        if not path.is_file():
            raise ConvertError(f"{path} (listed in the MTP heads' index) is missing; re-export the heads")
        for key, v in _safetensors_header(path).items():
            if key != "__metadata__":
                where[key], info[key] = path, (v["dtype"], tuple(v["shape"]))
    return heads["num_heads"], where, info


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _check_same_model(cfg: Config, derived: Config, config_path: str) -> None:
    a, b = mapping.effective(cfg), mapping.effective(derived)
    for key in a:
        if a[key] != b.get(key):
            raise ConvertError(
                f"wrong architecture: {key} is {a[key]!r} in --config {config_path} but {b.get(key)!r} in the HF "
                f"config.json (convert with the matching config)"
            )


def build_config(
    hf: dict,
    *,
    config_path: Optional[str],
    tp: Optional[int],
    ep: Optional[int],
    pp: Optional[int],
    etp: Optional[int],
    mtp_mode: str,
    mtp_heads: Optional[int],
    hf_mtp: int,
) -> tuple[Config, mapping.HFArch, int]:
    """Our Config for the imported model and the number of MTP heads it will have.

    Parallel sizes not given come from --config, else TP=EP=PP=1; ETP defaults to 1 for MoE (fine-grained
    experts, as the presets); MoE at TP > 1 gets sequence parallelism (megatron requires it).
    """
    arch, model, _ = mapping.model_fields_from_hf(hf)
    derived = config_from_dict({"model": model})
    if config_path:
        cfg = load_config(config_path)
        _check_same_model(cfg, derived, config_path)  # expert_bias=false with GLM: zero bias checked per tensor
        base = config_to_dict(cfg)
        wanted = cfg.mtp.num_heads
    else:
        base = config_to_dict(derived)
        base["name"] = "hf_import"
        wanted = None
    if mtp_mode == "auto":
        mtp_mode = "copy" if hf_mtp else ("init" if (wanted or mtp_heads) else "none")
    if mtp_mode == "copy":
        if not hf_mtp:
            raise ConvertError(
                "--mtp copy: the HF checkpoint has no MTP heads (no mtp/ sidecar, num_nextn_predict_layers is 0)"
            )
        heads = hf_mtp
        if mtp_heads is not None and mtp_heads != hf_mtp:
            raise ConvertError(f"--mtp copy takes all {hf_mtp} heads of the file; --mtp-heads {mtp_heads} disagrees")
        if wanted is not None and wanted != hf_mtp:
            raise ConvertError(
                f"--mtp copy: the file has {hf_mtp} MTP heads but --config asks for mtp.num_heads={wanted} "
                f"(use --mtp init for fresh heads)"
            )
    elif mtp_mode == "init":
        heads = mtp_heads or wanted or hf_mtp
        if not heads:
            raise ConvertError("--mtp init: how many heads? pass --mtp-heads N or a --config with mtp.num_heads")
    elif mtp_mode == "none":
        heads = 0
    else:
        raise ConvertError(f"--mtp {mtp_mode}: choose auto, copy, init or none")
    base["mtp"] = {**base.get("mtp", {}), "num_heads": heads}
    moe = bool(model.get("moe"))
    par = dict(base.get("parallel", {})) if config_path else {}
    tp = tp or par.get("tensor_model_parallel_size", 1)
    par.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp or par.get("pipeline_model_parallel_size", 1),
        expert_model_parallel_size=(ep or par.get("expert_model_parallel_size", 1)) if moe else 1,
        expert_tensor_parallel_size=(etp or par.get("expert_tensor_parallel_size") or 1) if moe else None,
        sequence_parallel=bool(moe and tp > 1) or bool(par.get("sequence_parallel", False)),
    )
    base["parallel"] = par
    cfg = config_from_dict(base)
    if mapping.choose_arch(cfg).name != arch.name:  # e.g. a --config whose router differs
        raise ConvertError(
            f"wrong architecture: the HF file is {arch.name} but --config maps to {mapping.choose_arch(cfg).name}"
        )
    return cfg, arch, heads


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def _hf_dtype(hf: dict, info: dict) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and hasattr(torch, name) and isinstance(getattr(torch, name), torch.dtype):
        return getattr(torch, name)
    emb = info.get("model.embed_tokens.weight")
    return _ST_DTYPES.get(emb[0], torch.float32) if emb else torch.float32


def _tokenizer(hf_dir: Path) -> Optional[dict]:
    from mtpd_megatron.convert.to_hf import tokenizer_info

    return tokenizer_info(str(hf_dir)) if (hf_dir / "tokenizer.json").is_file() else None


def _build(cfg: Config, vocab_rows: int, dtype: torch.dtype, init: bool):
    """The TP1 model: megatron-initialised (fresh MTP heads) or uninitialised memory that the files fill."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mtpd_megatron.model.builder import build_model

    model_parallel_cuda_manual_seed(cfg.training.seed)
    single = config_from_dict({**config_to_dict(cfg), "parallel": {}})
    if init:
        return build_model(single, vocab_size=vocab_rows, params_dtype=dtype)
    with torch.device("meta"):
        model = build_model(single, vocab_size=vocab_rows, params_dtype=dtype)
    return model.to_empty(device="cpu")


def convert_from_hf(
    hf_dir: str,
    out: str,
    *,
    config: Optional[str] = None,
    tp: Optional[int] = None,
    ep: Optional[int] = None,
    pp: Optional[int] = None,
    etp: Optional[int] = None,
    mtp: str = "auto",
    mtp_heads: Optional[int] = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> dict:
    """Convert HF directory `hf_dir` into checkpoint root `out` (created atomically). Returns a summary.

    Tensors with NaN/inf values are refused unless `allow_nonfinite`."""
    from safetensors import safe_open
    from tqdm import tqdm

    from mtpd_megatron.checkpoint.weights import save_model_weights
    from mtpd_megatron.convert.to_hf import exported_vocab_size
    from mtpd_megatron.model.builder import padded_vocab_size

    hf_root = Path(hf_dir)
    hf, where, info = inspect_hf_dir(hf_root)
    hf_mtp, head_where, head_info = inspect_heads(hf_root, hf)
    clash = sorted(set(head_where) & set(where))
    if clash:
        raise ConvertError(f"--hf {hf_root}: tensor {clash[0]} is both in the main files and in the MTP sidecar")
    where, info = {**where, **head_where}, {**info, **head_info}
    cfg, arch, heads = build_config(
        hf, config_path=config, tp=tp, ep=ep, pp=pp, etp=etp, mtp_mode=mtp, mtp_heads=mtp_heads, hf_mtp=hf_mtp
    )
    d = mapping.dims(cfg)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    copy_mtp = heads > 0 and hf_mtp > 0 and mtp in ("auto", "copy")
    if copy_mtp and not any(head_index(k, d.num_layers) is not None for k in where):
        raise ConvertError(
            f"--hf {hf_root} declares {hf_mtp} MTP heads but its files hold no model.layers.{d.num_layers}.* tensors"
        )

    # vocabulary: HF rows V_hf, model vocabulary V (tokenizer / config), megatron pads V to P at the target TP
    emb = info.get("model.embed_tokens.weight")
    if emb is None:
        raise ConvertError(f"--hf {hf_root}: no model.embed_tokens.weight (wrong architecture)")
    v_hf = emb[1][0]
    if hf.get("vocab_size") not in (None, v_hf):
        raise ConvertError(
            f"vocab mismatch: config.json vocab_size {hf.get('vocab_size')} but the embedding has {v_hf} rows"
        )
    tok = _tokenizer(hf_root)
    vocab = cfg.model.vocab_size or (tok["vocab_size"] if tok else exported_vocab_size(hf_root) or v_hf)
    if tok and tok["vocab_size"] > vocab:
        raise ConvertError(
            f"vocab mismatch: {tok['file']} has {tok['vocab_size']} tokens but model.vocab_size is {vocab}"
        )
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)
    if vocab > v_hf:
        raise ConvertError(
            f"vocab mismatch: the vocabulary is {vocab} tokens but the HF embedding has only {v_hf} rows "
            f"(set model.vocab_size in --config to the tokenizer the model was trained with)"
        )
    if v_hf > padded and progress:
        print(
            f"note: rows {padded}..{v_hf - 1} of the HF embedding/LM head are padding beyond the {vocab}-token "
            f"vocabulary and are dropped (megatron pads to {padded} at TP{tp})"
        )
    out_dtype = _hf_dtype(hf, info) if dtype == "auto" else DTYPES.get(dtype)
    if out_dtype is None:
        raise ConvertError(f"--dtype {dtype}: choose auto, bf16 or fp32")

    # which HF tensor fills which megatron slice
    groups = mapping.plan(cfg, arch)
    targets: dict = {}
    for g in groups:
        for rule in g.rules:
            for part, name in enumerate(rule.hf):
                targets[name] = (rule, part)
    for g in groups:  # transformers-5 fused expert tensors, for files saved without the Hub conversion
        for rule in g.rules:
            if rule.megatron and rule.megatron.endswith("router.weight"):
                prefix = rule.hf[0][: rule.hf[0].index(arch.moe_block + ".gate.weight")]
                for fused, members in mapping.fused_expert_names(arch, d, prefix).items():
                    targets[fused] = ("fused", members)

    with atomic_output_dir(out, overwrite) as tmp, megatron_world():
        if tok is not None:
            keep = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
            shutil.copytree(
                tok["file"].parent, tmp / "tokenizer", ignore=lambda _d, names: [n for n in names if n not in keep]
            )
            cfg = config_from_dict(
                {
                    **config_to_dict(cfg),
                    "data": {
                        **config_to_dict(cfg)["data"],
                        "tokenizer": str(Path(out).absolute() / "tokenizer" / "tokenizer.json"),
                    },
                }
            )
        model = _build(cfg, padded, out_dtype, init=heads > 0 and not copy_mtp)
        live = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
        planned = {r.megatron for g in groups for r in g.rules if r.megatron}
        if set(live) != planned:
            extra = sorted(set(live) ^ planned)
            raise ConvertError(f"converter and model disagree about parameter {extra[0]} (mapping.py is out of date)")
        need = {
            (r.megatron, p)
            for g in groups
            for r in g.rules
            if r.megatron
            for p in range(len(r.hf))
            if copy_mtp or not r.megatron.startswith("mtp.")
        }
        filled: set = set()
        files = sorted(set(where.values()))

        def read(f, path: Path, name: str) -> torch.Tensor:
            value = f.get_tensor(name)
            check_finite(name, value, path.name, allow_nonfinite)
            return value

        with torch.no_grad():
            for path in tqdm(files, desc="read HF shards", unit="file", disable=not progress or None):
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        target = targets.get(name)
                        if target is None:
                            if head_index(name, d.num_layers) is not None and (
                                not copy_mtp or name.endswith(MTP_SHARED_COPIES)
                            ):
                                continue
                            if name.endswith("rotary_emb.inv_freq"):
                                continue
                            raise ConvertError(
                                f"unexpected tensor {name} in {path.name}: not part of a {arch.architecture} of this "
                                f"shape (wrong architecture or config)"
                            )
                        if target[0] == "fused":
                            value = read(f, path, name)
                            for e, members in enumerate(target[1]):
                                parts = torch.chunk(value[e], len(members), dim=0)
                                for member, piece in zip(members, parts):
                                    _place(targets[member], piece, live, filled, d, name)
                            continue
                        rule, part = target
                        if rule.megatron is None:
                            value = read(f, path, name)
                            if value.numel() and value.abs().max() != 0:
                                raise ConvertError(
                                    f"{name} is non-zero but the config has no such tensor (e.g. expert_bias=false); "
                                    f"convert with a config that has it"
                                )
                            continue
                        if rule.megatron.startswith("mtp.") and not copy_mtp:
                            continue
                        _place(target, read(f, path, name), live, filled, d, name)
            missing = sorted(need - filled)
            if missing:
                rule_name, part = missing[0]
                hf_name = next(r.hf[part] for g in groups for r in g.rules if r.megatron == rule_name)
                raise ConvertError(
                    f"the HF checkpoint lacks {hf_name} ({len(missing)} tensors missing): "
                    f"incomplete or wrong architecture"
                )
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in live:
                    live[name][min(v_hf, padded) :].zero_()  # megatron's padding rows the file does not fill

        meta = build_meta(
            cfg,
            iteration=0,
            vocab_size=vocab,
            padded_vocab_size=padded,
            stage=STAGE,
            layout={
                "world_size": None,
                "tp": tp,
                "pp": pp,
                "ep": cfg.parallel.expert_model_parallel_size,
                "etp": cfg.parallel.expert_tensor_parallel_size or tp,
                "cp": 1,
            },
            source={
                "hf": str(hf_root.absolute()),
                "architecture": arch.architecture,
                "mtp": "copied" if copy_mtp else ("initialised" if heads else "none"),
            },
        )
        save_model_weights(model, tmp, meta)
        del model, live
    return {
        "out": str(Path(out).absolute()),
        "arch": arch.name,
        "mtp_heads": heads,
        "mtp": meta["source"]["mtp"],
        "vocab_size": vocab,
        "padded_vocab_size": padded,
        "dtype": str(out_dtype).replace("torch.", ""),
    }


def _place(target, value: torch.Tensor, live: dict, filled: set, d: mapping.Dims, name: str) -> None:
    rule, part = target
    dest = live[rule.megatron]
    slot = mapping.megatron_slot(rule, part, dest, d)
    if rule.megatron in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if value.shape[1:] != slot.shape[1:]:
            raise ConvertError(f"{name} has shape {tuple(value.shape)}, the model expects {tuple(slot.shape)}")
        value = value[: slot.shape[0]]  # rows beyond megatron's padded size are padding (checked by the caller)
        slot = slot[: value.shape[0]]
    expected = mapping.hf_shape_for_slot(rule, part, slot)
    if tuple(value.shape) != expected:
        raise ConvertError(f"{name} has shape {tuple(value.shape)}, the config gives {expected} (wrong architecture?)")
    mapping.fill_slot(slot, value, rule, part)
    filled.add((rule.megatron, part))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli_parser(
        "convert_from_hf.py",
        "Convert a Hugging Face model directory into a torch_dist checkpoint (loadable at any TP/EP/PP).",
    )
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to create (iter_0000000 inside)")
    p.add_argument(
        "--config",
        default=None,
        help="training YAML to take everything but the weights from (checked against config.json)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="target tensor-parallel size: fixes the vocabulary padding (default: --config's, else 1)",
    )
    p.add_argument("--ep", type=int, default=None, help="target expert-parallel size (default: --config's, else 1)")
    p.add_argument("--pp", type=int, default=None, help="target pipeline-parallel size (default: --config's, else 1)")
    p.add_argument("--etp", type=int, default=None, help="target expert-tensor-parallel size (default 1 for MoE)")
    p.add_argument(
        "--mtp",
        default="auto",
        choices=["auto", "copy", "init", "none"],
        help="MTP heads: copy from the file, fresh megatron init, or none (auto: copy if present)",
    )
    p.add_argument("--mtp-heads", type=int, default=None, help="number of heads for --mtp init")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="parameter dtype (auto = config.json's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors with NaN/inf values too")
    args = p.parse_args(argv)
    for flag in ("tp", "ep", "pp", "etp"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConvertError(f"--{flag} must be >= 1")
    s = convert_from_hf(
        args.hf,
        args.out,
        config=args.config,
        tp=args.tp,
        ep=args.ep,
        pp=args.pp,
        etp=args.etp,
        mtp=args.mtp,
        mtp_heads=args.mtp_heads,
        dtype=args.dtype,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"wrote {s['out']}: {s['arch']} weights, {s['mtp_heads']} MTP head(s) {s['mtp']}, "
        f"vocabulary {s['vocab_size']} padded to {s['padded_vocab_size']}, {s['dtype']}"
    )
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.cli import run_cli

    return run_cli("convert_from_hf.py", main, argv)  # ConvertError/ConfigError (ValueError), CheckpointError, OSError
