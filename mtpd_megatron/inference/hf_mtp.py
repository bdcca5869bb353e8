"""Drafting with an export's MTP heads in stock transformers: transformers' own MTP, fed from the export.

transformers 5 has MTP speculative decoding (`generate(use_mtp=True)`: MtpModel, MtpLayer, MtpCache,
MTPCandidateGenerator in transformers/modeling_layers.py and generation/candidate_generator.py), and the heads
we export are exactly its layout (DeepSeek-V3: enorm, hnorm, eh_proj over cat(embedding, hidden), a decoder
layer of the model's own class, shared_head.norm = its post_norm; embedding and LM head shared with the model).
What it cannot do with our exports is find the heads: `MtpModel.from_pretrained` reads them only from the main
checkpoint's files, picks them out with the class's `_keys_to_ignore_on_load_unexpected` patterns (Qwen3 and
Llama declare none, Glm4Moe only layers 46 and 92) and takes their number from `config.num_mtp_layers`.

This module does that part and nothing else: it builds transformers' MtpModel for an export's heads (the sidecar
`mtp/` directory, or inline `model.layers.{L+k}.*`), loads them through transformers' own weight conversions
(`MtpModel.get_weight_conversions`, the same call `from_pretrained` makes) and gives them to transformers'
MTPCandidateGenerator, so drafting (all K heads cascaded per step), verification by the main model and the
heads' cache are transformers' code. The output of `generate(use_mtp=True)` is plain greedy decoding's.

The file imports only torch, transformers, safetensors and the standard library, on purpose: the exporter ships
it as `custom_generate/generate.py`, transformers' hook for a generation method that comes with a model, so an
export drafts with every head without this package:

    model = AutoModelForCausalLM.from_pretrained(EXPORT)
    model.generate(ids, custom_generate=EXPORT, trust_remote_code=True, max_new_tokens=64)

and with it: `enable_mtp(model, EXPORT); model.generate(ids, use_mtp=True, ...)`. Written against transformers
5.24 and tested on 5.17 (the GPU machine's): where releases differ (`MtpModel.get_weight_conversions`,
`forward_layer`, MTPCandidateGenerator.__init__) it uses what the running release has or builds it from the
parts every 5.x release has.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional
from unittest import mock

import torch

SIDECAR_DIR = "mtp"  # the heads of a sidecar export live in EXPORT/mtp/
MANIFEST = "mtp_heads.json"  # EXPORT/mtp/mtp_heads.json describes them
FORMAT = "mtpd-mtp-heads/1"
LAYOUT = (
    "DeepSeek-V3 MTP: head k (1-based) is model.layers.{L+k-1}.* = enorm, hnorm, eh_proj, the decoder "
    "layer's own tensors, shared_head.norm; h_k[t] = shared_head.norm(layer(eh_proj(cat(enorm(embed(x[t+k])), "
    "hnorm(h_{k-1}[t]))))), logits_k = lm_head(h_k), h_0 = the model's final-normed hidden state; the "
    "embedding and the LM head are the main model's (not stored here)"
)


class MTPHeadsError(ValueError):
    """An export's heads are missing or do not fit the model: one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Where an export keeps its heads
# ---------------------------------------------------------------------------------------------------------


def weight_files(directory: Path) -> dict:
    """{tensor name: safetensors file} of a directory (its index, or its single model.safetensors)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise MTPHeadsError(f"{index} is not a safetensors index (no weight_map)") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise MTPHeadsError(f"{directory}: no model.safetensors(.index.json)")


def head_index(name: str, num_layers: int) -> Optional[int]:
    """0-based head of a DeepSeek-layout tensor name `model.layers.{L+k}.*`; None for other names."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        i = int(parts[2])
        return i - num_layers if i >= num_layers else None
    return None


def _is_head(name: str, num_layers: int, num_heads: int) -> bool:
    k = head_index(name, num_layers)
    return k is not None and k < num_heads


def _text_config(conf: dict) -> dict:
    return conf.get("text_config") or conf


def locate_heads(path) -> dict:
    """The heads of an export: {'layout': sidecar|inline|none, 'num_heads', 'num_hidden_layers',
    'files': {tensor name: file} (the heads' tensors only), 'manifest' (sidecar) or None}."""
    root = Path(path)
    manifest_path = root / SIDECAR_DIR / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            num, layers = int(manifest["num_heads"]), int(manifest["num_hidden_layers"])
        except (ValueError, KeyError, TypeError):
            raise MTPHeadsError(
                f"{manifest_path} is not an MTP heads manifest (num_heads, num_hidden_layers)"
            ) from None
        files = weight_files(root / SIDECAR_DIR)
        return {
            "layout": "sidecar",
            "num_heads": num,
            "num_hidden_layers": layers,
            "manifest": manifest,
            "files": {n: f for n, f in files.items() if _is_head(n, layers, num)},
        }
    try:
        conf = _text_config(json.loads((root / "config.json").read_text()))
    except FileNotFoundError:
        raise MTPHeadsError(f"{root}: no config.json (not a Hugging Face model directory)") from None
    except ValueError:
        raise MTPHeadsError(f"{root / 'config.json'} is not valid JSON") from None
    layers = int(conf["num_hidden_layers"])
    num = int(conf.get("num_nextn_predict_layers") or conf.get("num_mtp_layers") or 0)
    if not num:
        return {"layout": "none", "num_heads": 0, "num_hidden_layers": layers, "manifest": None, "files": {}}
    return {
        "layout": "inline",
        "num_heads": num,
        "num_hidden_layers": layers,
        "manifest": None,
        "files": {n: f for n, f in weight_files(root).items() if _is_head(n, layers, num)},
    }


# ---------------------------------------------------------------------------------------------------------
# transformers' MtpModel for the heads
# ---------------------------------------------------------------------------------------------------------


def _last_layer_is_dense(conf) -> Optional[bool]:
    """Qwen3-MoE picks dense vs MoE by layer index (mlp_only_layers, decoder_sparse_step); None elsewhere."""
    if getattr(conf, "model_type", None) != "qwen3_moe":
        return None
    last = conf.num_hidden_layers - 1
    step = getattr(conf, "decoder_sparse_step", 1) or 1
    return last in set(getattr(conf, "mlp_only_layers", None) or []) or (last + 1) % step != 0


@contextlib.contextmanager
def _mtp_fields(conf, num: int):
    """The config fields transformers' MtpModel reads (`get_mtp_config`), set for `num` heads only while it is built,
    so the model's config (and what save_pretrained writes) stays as loaded.

    Our head's inner layer has the structure of the model's last decoder layer (megatron builds it from that spec);
    transformers builds MTP layer k as decoder layer k, so index-based layer kinds are pointed at the last layer's.
    """
    fields = {"num_mtp_layers": num}
    if getattr(conf, "layer_types", None) is not None:
        fields["mtp_layer_types"] = [conf.layer_types[-1]] * num
    dense = _last_layer_is_dense(conf)
    if dense is not None:
        fields.update(mlp_only_layers=list(range(num)) if dense else [], decoder_sparse_step=1)
    aliases = getattr(conf, "attribute_map", None) or {}  # GLM: num_mtp_layers is num_nextn_predict_layers
    fields = {aliases.get(k, k): v for k, v in fields.items()}
    missing = object()
    saved = {k: conf.__dict__.get(k, missing) for k in fields}
    try:
        for k, v in fields.items():
            setattr(conf, k, v)
        yield
    finally:
        for k, v in saved.items():
            if v is missing:
                conf.__dict__.pop(k, None)
            else:
                setattr(conf, k, v)


def _weight_conversions(mtp, model) -> list:
    """The renamings that map the export's `model.layers.{L+i}.*` onto MtpModel's `layers.{i}.mtp_block.*`, then
    the model's own conversions: `MtpModel.get_weight_conversions` where transformers has it (5.24 here), else
    the same list built from the pieces earlier 5.x releases assemble inline in `MtpModel.from_pretrained` (the
    GPU machine's transformers)."""
    if hasattr(mtp, "get_weight_conversions"):
        return mtp.get_weight_conversions(model)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    layers = model.config.get_text_config().num_hidden_layers
    conversions = [
        WeightRenaming(source_patterns=f"layers.{n}.", target_patterns=f"layers.{n - layers}.mtp_block.")
        for n in range(layers, layers + mtp.num_mtp_layers)
    ]
    conversions.extend(get_model_conversion_mapping(mtp, add_legacy=False))
    main = getattr(model, "_weight_conversions", None)
    conversions.extend(main if main is not None else get_model_conversion_mapping(model))
    return conversions


def load_mtp_model(model, path=None, num_heads: Optional[int] = None):
    """transformers' MtpModel holding the first `num_heads` (default: all) heads of export `path` (default: where
    `model` was loaded from), tied to `model`'s embedding, LM head and rotary embedding."""
    from safetensors import safe_open
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_layers import MtpModel
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import ContextManagers

    path = Path(path or model.config.name_or_path)
    heads = locate_heads(path)
    available = heads["num_heads"]
    num = available if num_heads is None else int(num_heads)
    if not available:
        raise MTPHeadsError(
            f"{path}: the export has no MTP heads (no {SIDECAR_DIR}/{MANIFEST}, config.json declares "
            f"none); re-export with --mtp sidecar or attach them with tools/attach_mtp_heads.py"
        )
    if not 1 <= num <= available:
        raise MTPHeadsError(f"{path}: {available} MTP heads exported, {num} asked for (use 1..{available})")
    conf = model.config.get_text_config()
    if heads["num_hidden_layers"] != conf.num_hidden_layers:
        raise MTPHeadsError(
            f"{path}: the heads follow a {heads['num_hidden_layers']}-layer model, this one has "
            f"{conf.num_hidden_layers} layers"
        )
    with _mtp_fields(conf, num), ContextManagers(MtpModel.get_init_context(model.dtype, False, False, None)):
        mtp = MtpModel(model, num)
    layers = conf.num_hidden_layers
    wanted = {n: f for n, f in heads["files"].items() if head_index(n, layers) < num}
    if not wanted:
        raise MTPHeadsError(f"{path}: no model.layers.{layers}.* tensors for the {available} declared MTP heads")
    handles, state = [], {}
    try:
        for file in sorted(set(wanted.values())):
            handle = safe_open(str(file), framework="pt")
            handles.append(handle)
            for name in handle.keys():
                if name in wanted:
                    state[name] = handle.get_slice(name)
        device = next(model.get_decoder().layers[-1].parameters()).device
        info, _ = convert_and_load_state_dict_in_model(
            model=mtp,
            state_dict=state,
            load_config=LoadStateDictConfig(
                weight_mapping=_weight_conversions(mtp, model), device_map={"": device}, dtype=model.dtype
            ),
        )
    finally:
        for handle in handles:
            handle.__exit__(None, None, None)
    mtp._adjust_missing_and_unexpected_keys(info)
    problems = [
        f"{what} {sorted(keys)[:3]}"
        for what, keys in (
            ("missing", info.missing_keys),
            ("unexpected", info.unexpected_keys),
            ("mismatched", info.mismatched_keys),
            ("not converted", info.conversion_errors),
        )
        if keys
    ]
    if problems:
        raise MTPHeadsError(f"{path}: the MTP heads do not fit {type(model).__name__} ({'; '.join(problems)})")
    mtp.tie_with_main_model(model)
    return mtp.eval()


def forward_mtp_layer(mtp, k: int, hidden, positions, input_ids=None, inputs_embeds=None):
    """One depth of transformers' MtpModel without a cache (head k from h_{k-1} and the rolled tokens):
    `MtpModel.forward_layer` where transformers has it (5.24 here); earlier 5.x releases (the GPU machine's
    5.17) have only the whole drafting `forward`, so the same steps are taken from its parts. The layer is
    called positionally because its cache argument is `past_key_values` in 5.17 and `cache` in 5.24."""
    if hasattr(mtp, "forward_layer"):
        return mtp.forward_layer(k, hidden, positions, None, input_ids=input_ids, inputs_embeds=inputs_embeds)
    if inputs_embeds is None:
        inputs_embeds = mtp.embed_tokens(input_ids).to(hidden.device)
    masks = mtp.create_masks_for_mtp_layer(k, inputs_embeds, None, positions)
    rotary = mtp.rotary_emb(inputs_embeds, position_ids=positions) if mtp.rotary_emb is not None else None
    hidden = mtp.layers[k](inputs_embeds, hidden, rotary, masks.pop("attention_mask", None), positions, None, **masks)
    return mtp.shared_post_norm(hidden) if getattr(mtp, "use_shared_post_norm", False) else hidden


@torch.no_grad()
def teacher_forced_logits(model, mtp, input_ids: torch.Tensor) -> list:
    """Every head's logits over whole sequences, as megatron computes them in training: depth k at t sees
    h_{k-1}[t] and token t+k (the ids rolled left k times, zero-filled) -> one [b, s, V] tensor per head."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    ids, out = input_ids, []
    for k in range(len(mtp.layers)):
        ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        hidden = forward_mtp_layer(mtp, k, hidden, positions, input_ids=ids)
        out.append(mtp._project_to_logits(hidden))
    return out


# ---------------------------------------------------------------------------------------------------------
# generate(use_mtp=True) with those heads
# ---------------------------------------------------------------------------------------------------------


def _candidate_generator_class():
    from transformers.generation.candidate_generator import MTPCandidateGenerator
    from transformers.modeling_layers import MtpModel

    class ExportMTPCandidateGenerator(MTPCandidateGenerator):
        """transformers' MTP drafting with heads given rather than re-read from the main checkpoint; records per
        step the drafts and, from the next step's `n_last_matches`, how many the model accepted."""

        def __init__(self, main_model, mtp_model, generation_config, logits_processor=None, record=None):
            # transformers' own __init__, whatever its release sets up (5.17 and 5.24 differ: the hidden-state
            # override, the draft's EOS tensor), with the given heads in place of `MtpModel.from_pretrained`
            # re-reading the main checkpoint, and the config fields MtpCache reads set for them meanwhile
            def given_heads(*args, **kwargs):
                return mtp_model

            conf = main_model.config.get_text_config()
            with _mtp_fields(conf, len(mtp_model.layers)), mock.patch.object(MtpModel, "from_pretrained", given_heads):
                super().__init__(main_model, generation_config, {}, logits_processor)
            self.record = record if record is not None else {}
            self.record.update(drafts=[], accepted=[])

        def get_candidates(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kwargs):
            if self.record["drafts"]:
                self.record["accepted"].append(int(n_last_matches))
            ids, logits = super().get_candidates(
                input_ids,
                model_kwargs=model_kwargs,
                model_outputs=model_outputs,
                is_first_iteration=is_first_iteration,
                n_last_matches=n_last_matches,
                **kwargs,
            )
            if ids.shape[1] > input_ids.shape[1]:
                self.record["drafts"].append(ids[0, input_ids.shape[1] :].tolist())
            return ids, logits

    return ExportMTPCandidateGenerator


def enable_mtp(model, path=None, num_heads: Optional[int] = None):
    """Load export `path`'s heads (default: where `model` came from) and make `model.generate(use_mtp=True)` draft
    with them. Returns the MtpModel; its `mtp_record` holds the last generate's drafts and accepted counts.

    Only this model object changes (an instance attribute in front of GenerationMixin._get_candidate_generator);
    its state dict, config and save_pretrained output stay the stock class's.
    """
    mtp = load_mtp_model(model, path, num_heads)
    generator_cls = _candidate_generator_class()
    record: dict = {}
    object.__setattr__(mtp, "mtp_record", record)
    stock = type(model)._get_candidate_generator

    def _get_candidate_generator(*, generation_config, logits_processor, **kwargs):
        if generation_config.use_mtp:
            return generator_cls(model, mtp, generation_config, logits_processor, record)
        return stock(model, generation_config=generation_config, logits_processor=logits_processor, **kwargs)

    _get_candidate_generator.mtp_model = mtp
    model.__dict__["_get_candidate_generator"] = _get_candidate_generator
    return mtp


def enabled_mtp(model):
    """The MtpModel `enable_mtp` attached to `model`, or None."""
    return getattr(model.__dict__.get("_get_candidate_generator"), "mtp_model", None)


def generate(*args, model, num_mtp_heads: Optional[int] = None, **kwargs):
    """transformers' `custom_generate` entry (this file is the export's custom_generate/generate.py): attach the
    export's heads once (`num_mtp_heads` of them, default all) and run transformers' generate with use_mtp=True.
    Pass use_mtp=False for plain decoding. `model` is keyword-only because transformers passes it so, both from
    `generate(custom_generate=...)` and from `from_pretrained(trust_remote_code=True)`, which binds it with
    functools.partial in front of the caller's positional input ids."""
    mtp = enabled_mtp(model)
    if mtp is None or (num_mtp_heads is not None and len(mtp.layers) != num_mtp_heads):
        enable_mtp(model, None, num_mtp_heads)
    kwargs.setdefault("use_mtp", True)
    return type(model).generate(model, *args, **kwargs)


__all__ = [
    "FORMAT",
    "LAYOUT",
    "MANIFEST",
    "MTPHeadsError",
    "SIDECAR_DIR",
    "enable_mtp",
    "enabled_mtp",
    "generate",
    "head_index",
    "load_mtp_model",
    "locate_heads",
    "teacher_forced_logits",
    "weight_files",
]
