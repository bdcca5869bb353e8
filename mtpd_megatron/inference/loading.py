"""Load a training checkpoint's model weights for evaluation or decoding, at any TP/EP.

The trainer's checkpoints (mtpd_megatron/checkpoint) are torch_dist directories with a metadata JSON that
holds the whole config. Inference rebuilds the model from that config with the parallel layout asked for
here (TP=1 on one process by default) and loads only the `model` part of the sharded state dict: torch_dist
reshards, and the optimizer state in the checkpoint is simply not read.

The model is built with the checkpoint's *padded* vocabulary (so any TP that divides it works, whatever TP
the checkpoint was written at); the real vocabulary size comes back as `vocab_size`, which evaluation and
decoding pass as `vocab_limit` so padding rows are never predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mtpd_megatron.checkpoint import layout
from mtpd_megatron.checkpoint.layout import CheckpointError
from mtpd_megatron.config import config_from_dict
from mtpd_megatron.config.schema import Config


@dataclass
class LoadedModel:
    model: torch.nn.Module  # megatron GPTModel, eval mode, on `device`
    cfg: Config
    meta: dict
    path: Path
    vocab_size: int  # tokenizer vocabulary (ids >= this are padding)
    padded_vocab_size: int
    device: torch.device

    @property
    def label(self) -> str:
        """'MTP-D' when the run trained with the self-distillation KL, else 'MTP' (plus the iteration)."""
        kind = "MTP-D" if self.cfg.mtp.mtpd.enabled and self.cfg.mtp.num_heads else "MTP"
        return f"{kind} ({self.path.parent.name}/{self.path.name})"


def resolve_checkpoint(spec: str) -> Path:
    """An `iter_N` directory, or a save directory (-> its newest complete checkpoint)."""
    folder = Path(spec)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors*")):
        raise CheckpointError(
            f"--ckpt {spec}: this is a Hugging Face export, not a training checkpoint; convert "
            f"it with tools/convert_from_hf.py --hf {spec} --out CKPT_DIR (or load it with "
            "transformers)"
        )
    path = layout.resolve(str(spec), None, log=lambda *_: None, flag="--ckpt")
    if path is None:
        raise CheckpointError(f"--ckpt {spec}: no checkpoint found")
    return path


def inference_config(
    meta: dict, *, tp: int = 1, ep: int = 1, device: str = "auto", sequence_parallel: Optional[bool] = None
) -> Config:
    """The checkpoint's config with the parallel layout of this process (PP = CP = 1)."""
    cfg = config_from_dict(meta["config"])
    moe = bool(cfg.model.moe.num_experts)
    p = cfg.parallel
    p.tensor_model_parallel_size = tp
    p.expert_model_parallel_size = ep
    p.expert_tensor_parallel_size = None
    p.pipeline_model_parallel_size = 1
    p.context_parallel_size = 1
    # MoE at TP > 1 requires sequence parallelism in megatron (moe_layer.py); dense models go without.
    p.sequence_parallel = (moe and tp > 1) if sequence_parallel is None else sequence_parallel
    cfg.training.device = device
    cfg.checkpoint.async_save = False
    return cfg


def ensure_distributed(cfg: Config) -> torch.device:
    """Join the launcher's process group (world of one without a launcher) and build megatron's groups."""
    from megatron.core import parallel_state

    from mtpd_megatron.parallel.launch import init_distributed, read_env, resolve_device

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp != cfg.parallel.tensor_model_parallel_size:
            raise ValueError(
                f"megatron is already initialised with TP={tp}, not {cfg.parallel.tensor_model_parallel_size}"
            )
        return resolve_device(cfg.training.device)
    env = read_env()
    if env.world_size % cfg.parallel.tensor_model_parallel_size:
        raise ValueError(
            f"world size {env.world_size} is not a multiple of --tp {cfg.parallel.tensor_model_parallel_size}"
        )
    device = init_distributed(cfg, env)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_for_inference(
    spec: str,
    *,
    tp: int = 1,
    ep: int = 1,
    device: str = "auto",
    dtype: Optional[torch.dtype] = None,
    sequence_parallel: Optional[bool] = None,
) -> LoadedModel:
    """Build the checkpoint's model at this layout, load its weights (resharding), move to the device.

    `dtype` defaults to bfloat16 on CUDA and float32 on CPU. Collective: every rank calls it.
    """
    from mtpd_megatron.checkpoint.weights import load_model_state
    from mtpd_megatron.model.builder import build_model

    path = resolve_checkpoint(spec)
    meta = layout.read_meta(path)
    cfg = inference_config(meta, tp=tp, ep=ep, device=device, sequence_parallel=sequence_parallel)
    dev = ensure_distributed(cfg)
    padded = int(meta["padded_vocab_size"])
    if padded % tp:
        raise CheckpointError(f"checkpoint {path}: padded vocabulary {padded} is not divisible by --tp {tp}")
    model = build_model(cfg, vocab_size=padded, params_dtype=torch.float32)
    # The model part of the state dict only (checkpoint/weights.py); the optimizer state is not read.
    model.load_state_dict(load_model_state(model, path), strict=True)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = model.to(device=dev, dtype=dtype).eval()
    return LoadedModel(model, cfg, meta, path, int(meta["vocab_size"]), padded, dev)


# ------------------------------------------------------------------------------------------------------
# Evaluation text: held-out split of the training data, or a jsonl file
# ------------------------------------------------------------------------------------------------------


def load_tokenizer_for(loaded: LoadedModel, path: Optional[str] = None):
    """The tokenizer given, else the checkpoint config's data.tokenizer."""
    from mtpd_megatron.data import DataError, load_tokenizer

    path = path or loaded.cfg.data.tokenizer
    if not path:
        raise DataError(f"checkpoint {loaded.path} names no data.tokenizer: pass --tokenizer")
    tok = load_tokenizer(path)
    if tok.vocab_size != loaded.vocab_size:
        raise DataError(
            f"tokenizer {path} has {tok.vocab_size} tokens but checkpoint {loaded.path} was trained "
            f"with {loaded.vocab_size} (pass the training tokenizer with --tokenizer)"
        )
    return tok


def split_samples(
    loaded: LoadedModel,
    tokenizer,
    split: str,
    num_samples: int,
    seq_length: Optional[int] = None,
    data_paths: Optional[list] = None,
) -> list:
    """`num_samples` samples ({'tokens', 'labels', 'loss_mask'} of seq_length) of the valid or test split.

    The split is the training run's own document split (data.split in the checkpoint's config), so the
    documents were never trained on.
    """
    from mtpd_megatron.data import DataError, build_datasets

    data_cfg = loaded.cfg.data
    if data_paths:
        data_cfg.paths = list(data_paths)
    if not data_cfg.paths:
        raise DataError(f"checkpoint {loaded.path} names no data.paths: pass --data-path or use --jsonl")
    which = {"valid": 1, "test": 2}[split]
    counts = [0, 0, 0]
    counts[which] = num_samples
    datasets = build_datasets(
        data_cfg,
        tokenizer,
        seq_length=seq_length or data_cfg.seq_length,
        seed=loaded.cfg.training.seed,
        num_samples=counts,
    )
    ds = datasets[which]
    if ds is None or len(ds) == 0:
        raise DataError(f"the {split} split of data.split={data_cfg.split!r} is empty: use another --split or --jsonl")
    out = []
    for i in range(min(num_samples, len(ds))):
        sample = ds[i]
        out.append(
            {
                "tokens": torch.as_tensor(sample["tokens"]).long(),
                "labels": torch.as_tensor(sample["labels"]).long(),
                "loss_mask": torch.as_tensor(sample["loss_mask"]).float(),
            }
        )
    return out


def jsonl_texts(path: str) -> list:
    """Texts of a jsonl file: one JSON object per line with a "text" field (or a bare JSON string)."""
    import json

    from mtpd_megatron.data import DataError

    texts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f'{path}:{number}: not JSON (one object with a "text" field per line)') from None
            text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{number}: no "text" string field')
            texts.append(text)
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def jsonl_samples(path: str, tokenizer, seq_length: int, num_samples: int) -> list:
    """Documents of a jsonl file, each followed by the end-of-document token, cut into seq_length windows."""
    ids: list = []
    for text in jsonl_texts(path):
        ids += list(tokenizer.tokenize(text)) + [tokenizer.eod]
        if len(ids) >= seq_length * num_samples:
            break
    windows = [ids[i : i + seq_length] for i in range(0, len(ids) - seq_length + 1, seq_length)][:num_samples]
    if not windows:
        from mtpd_megatron.data import DataError

        raise DataError(f"{path}: fewer than --seq-length={seq_length} tokens in all")
    return [{"tokens": torch.tensor(w), "loss_mask": torch.ones(len(w))} for w in windows]
