"""torch_dist checkpoint (any TP/EP/PP) -> Hugging Face directory that stock transformers loads.

How the checkpoint is read (one CPU process, a gloo world of one): the TP1/EP1/PP1 GPTModel of the
checkpoint's config is built on the `meta` device (no memory, no init), and its own `sharded_state_dict()`
says, for every live parameter, which stored tensor (key, global offset, shape, SwiGLU split, stacked-layer
axis, expert axis) holds it. Those boxes are read straight from the torch DCP files with a small load
planner, one group (a decoder layer, an MTP head) at a time, so the model is never in memory as a whole:
peak memory is one layer plus one output shard. Because the boxes are global coordinates, the layout the
checkpoint was saved at (TP/EP/PP/ETP) does not matter. megatron's `dist_checkpointing.load` cannot do this
per layer: its torch-ShardedTensor conversion insists that all fragments of a stacked key are requested.

The sharded-state-dict format (stacked vs per-layer keys, SwiGLU `_w/_v` split) depends on the metadata the
saver passed; the CheckpointManager's is tried first, then Megatron-LM's variants, and the first whose keys
and shapes all exist in the checkpoint is used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mtpd_megatron.config.load import ConfigError, config_from_dict
from mtpd_megatron.config.schema import Config
from mtpd_megatron.convert import (
    ConvertError,
    atomic_output_dir,
    check_finite,
    cli_parser,
    mapping,
    megatron_world,
    mtp_heads,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_MAX_SHARD = 5 * 1024**3
SOURCE_FILE = "mtpd_source.json"  # what the export came from, incl. the unpadded vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---------------------------------------------------------------------------------------------------------
# Locating the checkpoint
# ---------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """`DIR` (a save root or an `iter_XXXXXXX` directory) -> a verified complete checkpoint directory."""
    from mtpd_megatron.checkpoint import layout

    root = Path(path)
    if not root.is_dir():
        raise ConvertError(
            f"--ckpt {root}: no such directory (pass a checkpoint.save directory or an iter_XXXXXXX in it)"
        )
    if iteration is not None:
        ckpt = root / layout.iter_dir_name(iteration) if layout.iteration_of(root) is None else root
        if layout.iteration_of(ckpt) != iteration:
            raise ConvertError(f"--ckpt {root} is iteration {layout.iteration_of(root)}, not --iteration {iteration}")
        if not ckpt.is_dir():
            have = [layout.iteration_of(p) for p in layout.complete_checkpoints(root)]
            raise ConvertError(f"--iteration {iteration}: {ckpt} does not exist (iterations here: {have or 'none'})")
    elif layout.iteration_of(root) is not None:
        ckpt = root
    else:
        tracker = root / layout.TRACKER_FILE
        ckpt = None
        if tracker.is_file():
            try:
                ckpt = root / layout.iter_dir_name(int(tracker.read_text().strip()))
            except ValueError:
                ckpt = None
        if ckpt is None or not ckpt.is_dir():
            found = layout.complete_checkpoints(root)
            if not found:
                raise ConvertError(f"--ckpt {root}: no iter_XXXXXXX checkpoint inside (not a checkpoint directory)")
            ckpt = found[-1]
    problem = layout.verify(ckpt, checksums=True)
    if problem:
        raise ConvertError(f"checkpoint {ckpt} is incomplete or damaged: {problem}")
    return ckpt


def read_checkpoint_meta(ckpt: Path) -> tuple[Config, dict]:
    from mtpd_megatron.checkpoint import layout

    meta = layout.read_meta(ckpt)
    try:
        cfg = config_from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise ConvertError(f"{ckpt / layout.META_FILE}: its config does not parse ({e})") from None
    return cfg, meta


def _single_process(cfg: Config) -> Config:
    """The same model at TP=EP=PP=1 (what this process builds), its MoE experts as megatron's SequentialMLP:
    the reader asks for every expert's tensor by its live name, and SequentialMLP describes the same global
    checkpoint tensors expert by expert that GroupedGemmExperts writes as one slab (model/grouped_experts.py)."""
    data = _asdict(cfg)
    data["model"] = {**data["model"], "moe": {**data["model"]["moe"], "experts_backend": "sequential"}}
    return config_from_dict(
        {
            **data,
            "parallel": {
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                "expert_model_parallel_size": 1,
                "expert_tensor_parallel_size": None,
                "sequence_parallel": False,
            },
        }
    )


def _asdict(cfg: Config) -> dict:
    from mtpd_megatron.config.load import config_to_dict

    return config_to_dict(cfg)


# ---------------------------------------------------------------------------------------------------------
# Reading tensors from torch_dist without building the model in memory
# ---------------------------------------------------------------------------------------------------------


class _BoxPlanner:
    """The part of torch DCP's LoadPlanner that FileSystemReader.read_data calls: where each read lands."""

    def __init__(self, dests: dict):
        self.dests = dests

    def resolve_tensor(self, read_item):
        dest = self.dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are read")


def _sharded_metadata_candidates() -> list:
    cands = []
    try:
        from mtpd_megatron.checkpoint.manager import sharded_metadata

        cands.append(sharded_metadata())
    except ImportError:
        pass
    return cands + [
        None,
        {"singleton_local_shards": True},
        {"non_homogeneous_layers": True},
        {"non_homogeneous_layers": True, "singleton_local_shards": True},
    ]


class CheckpointReader:
    """Reads live-named TP1 tensors of a torch_dist checkpoint, box by box (see the module docstring)."""

    def __init__(self, ckpt: Path, cfg: Config, vocab_rows: int, params_dtype: torch.dtype):
        from torch.distributed.checkpoint import FileSystemReader

        from mtpd_megatron.model.builder import build_model

        self.ckpt = ckpt
        self.storage = FileSystemReader(str(ckpt))
        self.md = self.storage.read_metadata()
        self.storage.set_up_storage_reader(self.md, True)
        with torch.device("meta"):
            self.model = build_model(_single_process(cfg), vocab_size=vocab_rows, params_dtype=params_dtype)
        self.metadata = self._detect_format()
        self.entries = self.model.sharded_state_dict(metadata=self.metadata)

    def _mismatch(self, metadata) -> Optional[str]:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        sd = self.model.sharded_state_dict(metadata=metadata)
        for name, entry in sd.items():
            if name.endswith("_extra_state"):
                continue
            built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
            for sh in nested_values(built) if isinstance(built, (dict, list)) else [built]:
                if not isinstance(sh, ShardedTensor):
                    continue
                stored = self.md.state_dict_metadata.get(sh.key)
                if stored is None:
                    return f"tensor {sh.key} (parameter {name}) is missing"
                if tuple(getattr(stored, "size", ())) != tuple(sh.global_shape):
                    return f"tensor {sh.key} has shape {tuple(stored.size)}, the config gives {tuple(sh.global_shape)}"
        return None

    def _detect_format(self):
        first = None
        for cand in _sharded_metadata_candidates():
            problem = self._mismatch(cand)
            if problem is None:
                return cand
            first = first or problem
        raise ConvertError(f"checkpoint {self.ckpt} does not hold the model its config describes: {first}")

    def _stored_dtype(self, entry) -> torch.dtype:
        """Read in the dtype the checkpoint holds (exact), not the one the meta model was built with."""
        for key in (entry.key, entry.key + "_w"):
            stored = self.md.state_dict_metadata.get(key)
            if stored is not None and hasattr(stored, "properties"):
                return stored.properties.dtype
        return entry.data.dtype

    def read(self, names: Sequence[str]) -> dict:
        """{live name: full TP1 tensor} for `names` (one DCP read for all of them)."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        built, factories, dests, items = {}, {}, {}, []
        for name in names:
            entry = self.entries.get(name)
            if entry is None:
                raise ConvertError(f"the model has no parameter {name} (converter and model disagree)")
            entry.data = torch.empty(entry.data.shape, dtype=self._stored_dtype(entry))
            if isinstance(entry, ShardedTensorFactory):
                factories[name] = entry
                built[name] = entry.build()
            else:
                built[name] = entry
        for value in built.values():
            for sh in nested_values(value) if isinstance(value, (dict, list)) else [value]:
                if not isinstance(sh, ShardedTensor):
                    continue
                if sh.flattened_range is not None:
                    raise ConvertError(f"tensor {sh.key} is stored flattened (distributed-optimizer layout)")
                sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                chunk = ChunkStorageMetadata(offsets=torch.Size(sh.global_offset), sizes=torch.Size(sizes))
                dests[(sh.key, tuple(sh.global_offset))] = sh.data.view(sizes)
                items += create_read_items_for_chunk_list(sh.key, self.md.state_dict_metadata[sh.key], [chunk])
        plan = self.storage.prepare_local_plan(LoadPlan(items))
        plan = self.storage.prepare_global_plan([plan])[0]
        try:
            self.storage.read_data(plan, _BoxPlanner(dests)).wait()
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise ConvertError(f"checkpoint {self.ckpt}: reading failed ({' '.join(str(e).split())[:200]})") from None
        out = {}
        for name, value in built.items():
            if name in factories:
                out[name] = factories[name].merge_fn(dict_list_map_outplace(lambda sh: sh.data, value))
            else:
                out[name] = value.data
            self.entries[name].data = None  # drop our reference: memory stays one group
        return out


# ---------------------------------------------------------------------------------------------------------
# Writing the HF directory
# ---------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Collects tensors and writes `model-0000X-of-0000N.safetensors` of at most `max_bytes` each."""

    def __init__(self, out: Path, max_bytes: int = DEFAULT_MAX_SHARD):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        # an own copy: safetensors refuses tensors that share storage (gate/up and q/k/v are views of one)
        self.buffer[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        part = f"part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(self.out / part), metadata={"format": "pt"})
        self.files.append((part, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> dict:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (part, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / part, self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(self.out / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)
        return index


def exported_vocab_size(path: str | os.PathLike) -> Optional[int]:
    """The unpadded vocabulary an export of ours recorded; None for other directories."""
    try:
        return int(json.loads((Path(path) / SOURCE_FILE).read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenizer_info(path: Optional[str]) -> Optional[dict]:
    """The tokenizer next to the training config: file, vocabulary size and special ids (None if absent)."""
    if not path:
        return None
    from mtpd_megatron.data import DataError
    from mtpd_megatron.data.tokenizer import EOD_TOKEN, PAD_TOKEN, read_hf_tokenizer, resolve_tokenizer_file

    try:
        file = resolve_tokenizer_file(path)
        tok = read_hf_tokenizer(file)
    except DataError:
        return None
    conf = {}
    if (file.parent / "tokenizer_config.json").is_file():
        try:
            conf = json.loads((file.parent / "tokenizer_config.json").read_text())
        except ValueError:
            conf = {}

    def special(key, default):
        value = conf.get(key) or default
        value = value.get("content") if isinstance(value, dict) else value
        return (
            (value, tok.token_to_id(value))
            if isinstance(value, str) and tok.token_to_id(value) is not None
            else (None, None)
        )

    eos, eos_id = special("eos_token", EOD_TOKEN)
    pad, pad_id = special("pad_token", PAD_TOKEN)
    bos, bos_id = special("bos_token", None)
    return dict(
        file=file,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos=eos,
        eos_id=eos_id,
        pad=pad,
        pad_id=pad_id,
        bos=bos,
        bos_id=bos_id,
    )


def write_tokenizer(tok: dict, out: Path, max_length: int) -> None:
    """Copy tokenizer.json & friends; add a tokenizer_config.json for AutoTokenizer if there is none."""
    src = tok["file"].parent
    shutil.copy2(tok["file"], out / "tokenizer.json")
    for name in TOKENIZER_FILES[1:]:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer_config.json").is_file():
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
        }
        for key in ("eos", "pad", "bos"):
            if tok[key] is not None:
                conf[f"{key}_token"] = tok[key]
        with open(out / "tokenizer_config.json", "w") as f:
            json.dump(conf, f, indent=2)


def write_hf(
    cfg: Config,
    read_group: Callable[[list], dict],
    out: Path,
    *,
    vocab_rows: int,
    dtype: torch.dtype,
    vocab_size: Optional[int] = None,
    tokenizer: Optional[dict] = None,
    num_mtp: Optional[int] = None,
    mtp_layout: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> dict:
    """Convert group by group (`read_group(live names) -> tensors`) and write everything HF needs into `out`.

    `vocab_rows` is megatron's padded vocabulary (kept: logits stay equal entry by entry); rows from
    `vocab_size` on are padding, which generation_config.json suppresses (megatron's decoding never picks them).
    `num_mtp` heads (default all) go where `mtp_layout` says (mtp_heads.py: sidecar, inline, none, auto).
    """
    from tqdm import tqdm

    arch = mapping.choose_arch(cfg)
    d = mapping.dims(cfg)
    groups = mapping.plan(cfg, arch, num_mtp)
    heads = sum(1 for g in groups if g.head is not None)
    layout = mtp_heads.choose_layout(arch, d.num_layers, heads, mtp_layout)
    if layout == "none":
        groups, heads = [g for g in groups if g.head is None], 0
    writer = ShardWriter(out, max_shard_bytes)
    head_writer = writer
    if layout == "sidecar":
        (out / mtp_heads.SIDECAR_DIR).mkdir()
        head_writer = ShardWriter(out / mtp_heads.SIDECAR_DIR, max_shard_bytes)
    for group in tqdm(groups, desc="convert to HF", unit="group", disable=not progress or None):
        tensors = read_group([r.megatron for r in group.rules if r.megatron is not None])
        target = writer if group.head is None else head_writer
        for rule in group.rules:
            src = tensors.pop(rule.megatron) if rule.megatron is not None else None
            if src is not None:
                check_finite(rule.megatron, src, "the checkpoint", allow_nonfinite)
            for name, t in mapping.to_hf_tensors(rule, src, d):
                target.add(name, t.to(torch.float32 if rule.fp32 else dtype))
        del tensors
    index = writer.finish()
    head_tensors = 0
    if layout == "sidecar":
        head_tensors = len(head_writer.finish()["weight_map"])
        mtp_heads.write_manifest(
            out / mtp_heads.SIDECAR_DIR,
            mtp_heads.manifest(
                arch,
                num_heads=heads,
                num_layers=d.num_layers,
                hidden=d.hidden,
                vocab_rows=vocab_rows,
                vocab_size=vocab_size,
                dtype=dtype,
                vocab_sha256=mtp_heads.vocab_fingerprint(tokenizer["file"] if tokenizer else None),
            ),
        )
    if heads:
        mtp_heads.ship_generate(out)

    special = {}
    if tokenizer:
        special = {
            "eos_token_id": tokenizer["eos_id"],
            "pad_token_id": tokenizer["pad_id"],
            "bos_token_id": tokenizer["bos_id"],
        }
    conf = mapping.hf_config_json(
        cfg,
        arch,
        vocab_rows,
        dtype=dtype,
        special_ids=special,
        extra=mtp_heads.config_fields(arch, layout, heads, d.num_layers),
    )
    with open(out / "config.json", "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, **{k: v for k, v in special.items() if v is not None})
    if vocab_size is not None and vocab_size < vocab_rows:
        gen.suppress_tokens = list(range(vocab_size, vocab_rows))  # megatron's padding rows are not tokens
    gen.save_pretrained(str(out))
    if tokenizer:
        write_tokenizer(tokenizer, out, cfg.model.max_position_embeddings)
    return {
        "arch": arch.name,
        "tensors": len(index["weight_map"]) + head_tensors,
        "bytes": index["metadata"]["total_size"],
        "shards": len(set(index["weight_map"].values())),
        "mtp_layout": layout,
        "mtp_heads": heads,
    }


def read_checkpoint_heads(ckpt: str, iteration: Optional[int] = None) -> dict:
    """A checkpoint's MTP heads as HF tensors (names and dtype as convert_to_hf writes them), for
    mtp_heads.attach_heads: {'tensors', 'num_heads', 'num_layers', 'vocab_rows', 'vocab_size', 'arch',
    'vocab_sha256'}."""
    path = resolve_checkpoint(ckpt, iteration)
    cfg, meta = read_checkpoint_meta(path)
    arch = mapping.choose_arch(cfg)
    d = mapping.dims(cfg)
    if not d.mtp:
        raise ConvertError(f"--heads {path}: the checkpoint has no MTP heads (mtp.num_heads = 0)")
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata.get("embedding.word_embeddings.weight")
    if stored is None:
        raise ConvertError(f"checkpoint {path} has no embedding.word_embeddings.weight (not a GPT checkpoint)")
    rows, dtype = int(stored.size[0]), stored.properties.dtype
    tok = tokenizer_info(cfg.data.tokenizer)
    tensors: dict = {}
    with megatron_world():
        reader = CheckpointReader(path, cfg, rows, dtype)
        for group in mapping.plan(cfg, arch):
            if group.head is None:
                continue
            got = reader.read([r.megatron for r in group.rules if r.megatron is not None])
            for rule in group.rules:
                src = got.pop(rule.megatron) if rule.megatron is not None else None
                for name, t in mapping.to_hf_tensors(rule, src, d):
                    tensors[name] = t.to(torch.float32 if rule.fp32 else dtype).contiguous().clone()
    return {
        "tensors": tensors,
        "num_heads": d.mtp,
        "num_layers": d.num_layers,
        "vocab_rows": rows,
        "vocab_size": meta.get("vocab_size"),
        "arch": arch,
        "vocab_sha256": mtp_heads.vocab_fingerprint(tok["file"] if tok else None),
    }


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def convert_to_hf(
    ckpt: str,
    out: str,
    *,
    dtype: str = "auto",
    iteration: Optional[int] = None,
    tokenizer: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD,
    mtp: str = "auto",
    mtp_heads_count: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> dict:
    """Convert checkpoint `ckpt` into HF directory `out` (created atomically). Returns a summary.

    The checkpoint's files are checked against integrity.json first; tensors with NaN/inf values are
    refused unless `allow_nonfinite`."""
    path = resolve_checkpoint(ckpt, iteration)
    cfg, meta = read_checkpoint_meta(path)
    arch = mapping.choose_arch(cfg)  # refuse before any work
    mtp_heads.choose_layout(arch, cfg.model.num_layers, cfg.mtp.num_heads, mtp)
    if mtp_heads_count is not None and not 0 <= mtp_heads_count <= cfg.mtp.num_heads:
        raise ConvertError(
            f"--mtp-heads {mtp_heads_count}: the checkpoint has {cfg.mtp.num_heads} MTP heads "
            f"(use 0..{cfg.mtp.num_heads})"
        )
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata.get("embedding.word_embeddings.weight")
    if stored is None:
        raise ConvertError(f"checkpoint {path} has no embedding.word_embeddings.weight (not a GPT checkpoint)")
    rows = int(stored.size[0])
    vocab = meta.get("vocab_size")
    padded = meta.get("padded_vocab_size")
    if padded is not None and padded != rows:
        raise ConvertError(
            f"checkpoint {path}: metadata says padded vocabulary {padded} but the embedding has {rows} rows"
        )
    tok = tokenizer_info(tokenizer if tokenizer is not None else cfg.data.tokenizer)
    if tokenizer is not None and tok is None:
        raise ConvertError(f"--tokenizer {tokenizer}: no readable tokenizer.json there")
    if tok is not None:
        if vocab is not None and tok["vocab_size"] != vocab:
            raise ConvertError(
                f"vocab mismatch: tokenizer {tok['file']} has {tok['vocab_size']} tokens but the checkpoint was "
                f"trained with {vocab} (pass --tokenizer with the training tokenizer)"
            )
        if tok["vocab_size"] > rows:
            raise ConvertError(
                f"vocab mismatch: tokenizer {tok['file']} has {tok['vocab_size']} tokens, the model only {rows}"
            )
    if vocab is not None and rows < vocab:
        raise ConvertError(f"vocab mismatch: checkpoint embedding has {rows} rows for vocabulary size {vocab}")
    stored_dtype = stored.properties.dtype
    out_dtype = stored_dtype if dtype == "auto" else DTYPES.get(dtype)
    if out_dtype is None:
        raise ConvertError(f"--dtype {dtype}: choose auto, bf16 or fp32")

    with atomic_output_dir(out, overwrite) as tmp, megatron_world():
        reader = CheckpointReader(path, cfg, rows, stored_dtype)
        summary = write_hf(
            cfg,
            reader.read,
            tmp,
            vocab_rows=rows,
            dtype=out_dtype,
            tokenizer=tok,
            vocab_size=vocab if vocab is not None else (tok["vocab_size"] if tok else None),
            num_mtp=mtp_heads_count,
            mtp_layout=mtp,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
        )
        source = {
            "checkpoint": str(path.absolute()),
            "iteration": meta.get("iteration"),
            "megatron_core_version": meta.get("megatron_core_version"),
            "vocab_size": vocab,
            "padded_vocab_size": rows,
            "mtp_heads": summary["mtp_heads"],
            "mtp_layout": summary["mtp_layout"],
            "mtp_hidden": "each head's input hidden is the previous depth's output after its final norm",
        }
        with open(tmp / SOURCE_FILE, "w") as f:
            json.dump(source, f, indent=2)
    summary.update(out=str(Path(out).absolute()), checkpoint=str(path), dtype=str(out_dtype).replace("torch.", ""))
    return summary


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().rstrip("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise ConvertError(f"--max-shard-size {text}: use a byte count or e.g. 5GB, 500MB") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli_parser(
        "convert_to_hf.py", "Convert a torch_dist checkpoint (any TP/EP/PP) into a Hugging Face model directory."
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint.save directory (its tracked/newest iteration) or an iter_XXXXXXX directory",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="weights dtype (auto = as stored in the checkpoint)",
    )
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the tracked one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to ship (default: the config's data.tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument(
        "--mtp",
        default="auto",
        choices=list(mtp_heads.LAYOUTS),
        help="where the MTP heads go: sidecar = own mtp/ directory, the main files keep exactly the stock "
        "class's keys (strict loaders such as vLLM's load them); inline = model.layers.{L+k}.* in "
        "the main files (vLLM/SGLang GLM MTP); none = no heads; auto (default) = inline only where "
        "the stock transformers class declares those layers itself, else sidecar (docs/serving.md)",
    )
    p.add_argument(
        "--mtp-heads",
        type=int,
        default=None,
        help="export only the first N heads (default all; SGLang's NextN takes exactly 1)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors with NaN/inf values too")
    args = p.parse_args(argv)
    summary = convert_to_hf(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        iteration=args.iteration,
        tokenizer=args.tokenizer,
        max_shard_bytes=_parse_size(args.max_shard_size),
        mtp=args.mtp,
        mtp_heads_count=args.mtp_heads,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    heads = (
        f", {summary['mtp_heads']} MTP head(s) {summary['mtp_layout']}" if summary["mtp_heads"] else ", no MTP heads"
    )
    print(
        f"wrote {summary['out']}: {summary['arch']} ({summary['tensors']} tensors, {summary['shards']} shard(s), "
        f"{summary['bytes'] / 1e6:.1f} MB {summary['dtype']}{heads}) from {summary['checkpoint']}"
    )
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from mtpd_megatron.cli import run_cli

    return run_cli("convert_to_hf.py", main, argv)  # ConvertError/ConfigError (ValueError), CheckpointError, OSError
