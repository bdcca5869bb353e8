"""Fine-tune an HF export with its MTP heads under DeepSpeed ZeRO (stage 2 or 3), and write an export with the heads.

Why DeepSpeed: the HF export is what users post-train, and a stock `from_pretrained -> Trainer -> save_pretrained`
drops the heads (mtp_heads.py). DeepSpeed's ZeRO partitions optimizer state and gradients (stage 2) or the
parameters too (stage 3) over data-parallel ranks with the plain transformers module, so the heads train in the
same module tree as the main model (posttrain/model.py) and need nothing of megatron's layout. The optimizer is
torch's AdamW handed to DeepSpeed (no DeepSpeed op is compiled: the GPU machine has no CUDA compiler), the
schedule linear warmup + cosine, bf16 with fp32 master weights on GPU.

On CPU (tests) DeepSpeed runs with DS_ACCELERATOR=cpu over gloo; its shared-memory all-reduce kernel, a C++
extension compiled on first use (minutes on a busy machine), is switched off there: gloo does the collectives.

The written export is the input export's layout: the main model through save_pretrained (stock keys), the heads
in the `mtp/` sidecar with a fresh manifest, custom_generate/generate.py, the tokenizer and the source record,
plus `mtpd_posttrain.json` (the config, the loss log and the held-out scores). It appears whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from mtpd_megatron.posttrain.config import PosttrainConfig, config_dict, validate_posttrain

RECORD = "mtpd_posttrain.json"
_NOT_COPIED = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _say(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def resolve_device(cfg: PosttrainConfig) -> torch.device:
    want = cfg.training.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        from mtpd_megatron.config.load import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda: no GPU is visible here (use auto or cpu)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(cfg: PosttrainConfig, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.dtype]


def init_deepspeed(device: torch.device) -> None:
    """One process group for the run (torchrun's env, or a world of one), DeepSpeed's communication on it."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        from mtpd_megatron.parallel.launch import free_port

        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    import deepspeed

    if device.type == "cpu":  # gloo does the CPU collectives: DeepSpeed's shared-memory all-reduce is a C++
        # extension compiled on first use (~270 s measured on 2 cores) for a CPU path that is for tests only
        import deepspeed.ops as ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ops.__compatible_ops__ = {**ops.__dict__.get("__compatible_ops__", {}), ShareMemCommBuilder.NAME: False}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def deepspeed_config(cfg: PosttrainConfig, dtype: torch.dtype) -> dict:
    t = cfg.training
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0)  # partition every parameter, small ones included
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's fused Adam would need nvcc
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: PosttrainConfig) -> Callable[[int], float]:
    t = cfg.training

    def factor(step: int) -> float:
        if t.lr_warmup_iters and step < t.lr_warmup_iters:
            return (step + 1) / t.lr_warmup_iters
        span = max(1, t.train_iters - t.lr_warmup_iters)
        progress = min(1.0, (step - t.lr_warmup_iters) / span)
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def set_trainable(wrapper, heads_mode: str) -> None:
    for p in wrapper.mtp.parameters():
        p.requires_grad_(heads_mode != "frozen")


def _gathered_state(engine, module) -> dict:
    """The module's full state dict on every rank (ZeRO-3: gathered from the partitions; a no-op otherwise)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def write_export(
    wrapper,
    main_state: dict,
    head_state: dict,
    source: Path,
    out: Path,
    dtype: torch.dtype,
    record: dict,
    overwrite: bool,
) -> None:
    """The fine-tuned export at `out` (atomically): main weights via save_pretrained, heads as a sidecar."""
    from mtpd_megatron.convert import atomic_output_dir
    from mtpd_megatron.convert.from_hf import inspect_hf_dir
    from mtpd_megatron.convert.mtp_heads import check_fit, manifest, read_source, ship_generate, write_manifest
    from mtpd_megatron.convert.to_hf import ShardWriter
    from mtpd_megatron.inference.hf_mtp import SIDECAR_DIR
    from mtpd_megatron.posttrain.model import head_tensors

    src = read_source(str(source))
    heads = {n: t.to(dtype) for n, t in head_tensors(wrapper, head_state).items()}
    expected = {n for n in src["tensors"] if int(n.split(".")[2]) - src["num_layers"] < wrapper.num_heads}
    if set(heads) != expected:
        extra, missing = sorted(set(heads) - expected), sorted(expected - set(heads))
        raise ValueError(
            f"the fine-tuned heads' names differ from {source}'s ({extra[:2]} new, {missing[:2]} "
            f"missing): transformers' MtpModel names changed"
        )
    with atomic_output_dir(out, overwrite) as tmp:
        main = wrapper.main
        main.save_pretrained(str(tmp), state_dict={k: v.to(dtype) for k, v in main_state.items()})
        for item in source.iterdir():  # tokenizer, source record: what save_pretrained does not write
            if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(".safetensors"):
                shutil.copy2(item, tmp / item.name)
        writer = ShardWriter(tmp / SIDECAR_DIR)
        (tmp / SIDECAR_DIR).mkdir(exist_ok=True)
        for name in sorted(heads):
            writer.add(name, heads[name])
        writer.finish()
        conf, _, info = inspect_hf_dir(tmp)
        fit = {**src, "num_heads": wrapper.num_heads, "tensors": heads}
        check_fit(fit, tmp, conf, info)
        write_manifest(
            tmp / SIDECAR_DIR,
            manifest(
                src["arch"],
                num_heads=wrapper.num_heads,
                num_layers=src["num_layers"],
                hidden=conf["hidden_size"],
                vocab_rows=src["vocab_rows"],
                vocab_size=src.get("vocab_size"),
                dtype=dtype,
                vocab_sha256=src.get("vocab_sha256"),
            ),
        )
        ship_generate(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _batches(train: torch.Tensor, micro: int, rank: int, world: int, seed: int):
    """Endless micro-batches of this rank's share, reshuffled every epoch."""
    epoch = 0
    while True:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch))
        mine = order[rank::world]
        for lo in range(0, len(mine) - micro + 1, micro):
            yield train[mine[lo : lo + micro]]
        epoch += 1


def finetune(cfg: PosttrainConfig, *, data=None, evaluate: bool = True) -> dict:
    """Validate, train, write `cfg.out`; returns the run record (also in OUT/mtpd_posttrain.json) on every rank.

    `data` (a posttrain.data.DomainData) lets the experiment tokenise the domain once for several runs.
    """
    validate_posttrain(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    init_deepspeed(device)
    import deepspeed
    import torch.distributed as dist

    from mtpd_megatron.posttrain.data import load_domain
    from mtpd_megatron.posttrain.loss import head_objective, posttrain_loss
    from mtpd_megatron.posttrain.model import load_with_heads, restore_buffers, rotary_buffers

    rank, world = dist.get_rank(), dist.get_world_size()
    source = Path(cfg.model.path)
    if data is None:
        data = load_domain(cfg.data, source / "tokenizer.json", seed=cfg.training.seed)
    t = cfg.training
    if len(data.train) < t.micro_batch_size * world:
        from mtpd_megatron.config.load import ConfigError

        raise ConfigError(
            f"training.micro_batch_size={t.micro_batch_size}: {len(data.train)} training sequences "
            f"for {world} ranks (lower it or data.seq_length)"
        )
    torch.manual_seed(t.seed)
    wrapper = load_with_heads(
        str(source), cfg.mtp.num_heads, dtype=torch.float32, device=device, detach_heads=cfg.mtp.detach_heads
    )
    wrapper.train()
    set_trainable(wrapper, cfg.heads)
    rope = rotary_buffers(wrapper)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapper,
        optimizer=opt,
        config=deepspeed_config(cfg, dtype),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)),
    )
    restore_buffers(rope)
    objective = head_objective(cfg.mtp, cfg.heads)
    _say(
        f"posttrain {cfg.name}: {source} -> {cfg.out}; heads={cfg.heads} ({wrapper.num_heads}), ZeRO-"
        f"{cfg.deepspeed.zero_stage} on {world} {device.type} rank(s), {str(dtype).replace('torch.', '')}; "
        f"{len(data.train)} training / {len(data.valid)} held-out sequences of {cfg.data.seq_length} tokens"
    )
    log, batches, t0 = [], _batches(data.train, t.micro_batch_size, rank, world, t.seed), time.perf_counter()
    for step in range(1, t.train_iters + 1):
        parts = None
        for _ in range(t.gradient_accumulation_steps):
            batch = next(batches).to(device)
            main_logits, head_logits = engine(batch[:, :-1], with_heads=objective is not None)
            parts = posttrain_loss(main_logits, head_logits, batch[:, 1:], objective)
            engine.backward(parts.loss)
            engine.step()
        if step % t.log_interval == 0 or step == t.train_iters:
            row = {
                "step": step,
                "loss": float(parts.loss.detach()),
                "main_ce": float(parts.main_ce),
                "head_ce": [float(x) for x in parts.head_ce],
                "head_kl": [float(x) for x in parts.head_kl],
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
            log.append(row)
            heads_txt = " ".join(f"{c:.3f}/{k:.3f}" for c, k in zip(row["head_ce"], row["head_kl"]))
            _say(
                f"step {step}/{t.train_iters} loss {row['loss']:.4f} main_ce {row['main_ce']:.4f}"
                + (f" heads ce/kl {heads_txt}" if heads_txt else "")
                + f" lr {row['lr']:.2e} "
                f"({row['seconds']:.1f}s)"
            )
    train_seconds = time.perf_counter() - t0
    main_state = _gathered_state(engine, wrapper.main)
    head_state = _gathered_state(engine, wrapper.mtp)
    record = {
        "config": config_dict(cfg),
        "source": str(source.absolute()),
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "deepspeed": deepspeed.__version__,
        "data": {
            "documents": data.documents,
            "tokens": data.tokens,
            "train_sequences": len(data.train),
            "valid_sequences": len(data.valid),
            "sources": data.sources,
        },
        "train_seconds": train_seconds,
        "log": log,
    }
    out = Path(cfg.out)
    if rank == 0:
        record["export"] = str(out.absolute())
        write_export(wrapper, main_state, head_state, source, out, _export_dtype(source, dtype), record, cfg.overwrite)
    del engine, opt, wrapper, main_state, head_state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    if evaluate and rank == 0:
        from mtpd_megatron.posttrain.evaluate import draft_check, evaluate_export

        record["eval"] = evaluate_export(
            out, data.valid, batch_size=t.eval_batch_size, device=device, dtype=dtype, label=cfg.name
        )
        record["draft"] = draft_check(out, data.valid[0, :32], device=device, dtype=dtype)
        _say(
            f"held-out: main_loss {record['eval']['main_loss']:.4f} tau {record['eval']['tau']:.3f} a_k "
            f"[{' '.join(f'{x:.3f}' for x in record['eval']['a'])}]; reload + draft: "
            f"{'equal to greedy' if record['draft']['equal'] else 'DIFFERS from greedy'}, "
            f"{record['draft']['tokens_per_step']:.2f} tokens/step"
        )
        from mtpd_megatron.checkpoint.layout import write_atomic

        write_atomic(out / RECORD, json.dumps(record, indent=1) + "\n")
    dist.barrier()
    return record


def _export_dtype(source: Path, train_dtype: torch.dtype) -> torch.dtype:
    """The source export's dtype (a fine-tune does not change the file format); the training dtype otherwise."""
    try:
        name = json.loads((source / "config.json").read_text()).get("torch_dtype") or json.loads(
            (source / "config.json").read_text()
        ).get("dtype")
    except (OSError, ValueError):
        name = None
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(name, train_dtype)
