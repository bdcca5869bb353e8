#!/usr/bin/env python3
"""Training throughput of a preset's shape: no MTP / MTP / MTP-D in one process, same data, same seed.

    python3 tools/bench_train.py --config configs/dense_2b.yaml --out $OUT/dense_2b --steps 4 --warmup 2 \
        --profile mtpd --compare fused_output_layer,share_teacher_logits training.global_batch_size=4
    python3 tools/bench_train.py --config configs/moe_a1b.yaml --layers 6 --arms mtpd --compare grouped_gemm \
        training.global_batch_size=4

Set the global batch: the presets' training.global_batch_size is the pretraining recipe's (512 sequences of
4096 tokens: a dense_2b step is then a minute on an H200). docs/benchmarks.md has the measured commands.

Each arm builds the real trainer (mtpd_megatron.trainer.Trainer: GPTModel + MTP heads + the MTP-D hook,
megatron DDP, megatron's optimizer and pipeline schedule) and times `Trainer.train_step()`: forward, backward
and optimizer step of `training.global_batch_size` samples, synchronised on the GPU; the first `--warmup`
steps (allocator growth, torch.compile, cuBLAS heuristics) are not counted. Arms:
  nomtp: mtp.num_heads=0;  mtp: the config's heads with mtp.mtpd.enabled=false (CE only);  mtpd: the config.
Data are synthetic: uniform random token ids written as a megatron indexed dataset (with a WordLevel
tokenizer.json of the model's vocabulary) into a temporary directory, read through the trainer's own data
pipeline. Throughput does not depend on the token values except through MoE routing: random tokens route
roughly uniformly (real text routes less evenly, so an MoE run on text can be slower).

Weights are drawn on the GPU (model.init_on_device=true, megatron's own default; `--init cpu` for the
trainer's host initialisation, ~10 s per billion parameters): every run builds a fresh model.
Parallelism: one process (torchrun is not needed); `parallel.*` is reset to world size 1 (EP 1, TP 1) unless
given as overrides. `--layers N` overrides model.num_layers (and cuts a list model.moe.layer_freq to N).

Reported per run (printed, and in <out>/bench.json):
  step_ms       mean wall time of one timed train_step;
  tokens_per_s  global_batch_size * seq_length / step time;
  tflops        tokens_per_s * FLOPs per token / 1e12, with the trainer's own formula
                (mtpd_megatron.logging_utils.flops_per_token): 6 * (active non-embedding parameters
                + (1 + K) * V * h)  [decoder + K MTP heads' transformer layers and projections, main output
                layer and the K heads' output layers, forward + backward]  + 6 * (L + K) * s * d_attn
                [causal attention scores and values]  + 2 * V * h when MTP-D is on [the teacher logits,
                forward only]. The heads' FLOPs count, so MTP arms are not flattered by work left uncounted;
                the same formula for every switch (a switch that skips work shows up as more TFLOP/s);
  mfu           tflops / device peak (H200 / H100 bf16 dense: 989 TFLOP/s; null on CPU);
  peak_gib      torch.cuda.max_memory_allocated over the run (null on CPU);
  losses        the main loss of every step (same seed and data: runs of one --compare must agree; from the
                second step on they carry the previous steps' gradients, heads' included);
  heads         the MTP-D hook's per-head CE, KL and acceptance over the run's steps (exact switches: equal).
`--compare a,b,a+b` runs the MTP-D arm with each switch (or each +-joined group of switches together) on
and off (SWITCHES below); a run whose
effective configuration equals one already measured (the off run of a switch that is off by default is the
MTP-D baseline itself) is not repeated: its entry is a copy with `same_run_as` naming the measured run.
bench.json is rewritten after every run, so a run cut short by a timeout keeps what was measured.
`--profile ARM` profiles one extra step of that arm with torch.profiler and writes the key-averages table
(top kernels by device time) to <out>/profile_<ARM>.txt. For MoE configs with grouped experts,
`grouped_check` holds the max abs difference of one MoE layer's experts between torch grouped_mm and
megatron's SequentialMLP loop (same weights, bf16 on GPU).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("nomtp", "mtp", "mtpd")
# --compare switches: config override for on, for off.
SWITCHES = {
    "fused_output_layer": ("mtp.mtpd.fused_output_layer=true", "mtp.mtpd.fused_output_layer=false"),
    "share_teacher_logits": ("mtp.mtpd.share_teacher_logits=true", "mtp.mtpd.share_teacher_logits=false"),
    "fused_adam": ("training.fused_adam=true", "training.fused_adam=false"),
    "foreach_multi_tensor": ("training.foreach_multi_tensor=true", "training.foreach_multi_tensor=false"),
    "compile_layers": ("model.compile_layers=true", "model.compile_layers=false"),
    "grouped_gemm": ("model.moe.experts_backend=grouped", "model.moe.experts_backend=sequential"),
}
ARM_OVERRIDES = {"nomtp": ["mtp.num_heads=0", "mtp.mtpd.enabled=false"], "mtp": ["mtp.mtpd.enabled=false"], "mtpd": []}
DEFAULT_VOCAB = 1000  # configs whose vocab comes from a tokenizer (vocab_size: null)


def parse_args(argv=None):
    from mtpd_megatron.cli import cli_parser

    ap = cli_parser("bench_train.py", __doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="preset YAML (configs/dense_2b.yaml, configs/moe_a1b.yaml, ...)")
    ap.add_argument("--out", required=True, help="directory for bench.json (and profile_<arm>.txt)")
    ap.add_argument("--arms", default="nomtp,mtp,mtpd", help="comma list of nomtp, mtp, mtpd")
    ap.add_argument("--layers", type=int, default=None, help="override model.num_layers (fit one GPU)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--compare", default="", help=f"comma list of switches: {', '.join(SWITCHES)}")
    ap.add_argument("--profile", default=None, help="profile one step of this arm")
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument(
        "--init",
        default="device",
        choices=("device", "cpu"),
        help="where the initial weights are drawn (model.init_on_device): device = on the GPU "
        "(seconds for billions of parameters; default), cpu = the trainer's default host init",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (after the flags)")
    args = ap.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.compare = [s for s in args.compare.split(",") if s]
    for arm in args.arms:
        if arm not in ARMS:
            ap.error(f"--arms: unknown arm {arm!r} (choose from {', '.join(ARMS)})")
    for item in args.compare:
        for switch in item.split("+"):
            if switch not in SWITCHES:
                ap.error(
                    f"--compare: unknown switch {switch!r} (choose from {', '.join(SWITCHES)}; "
                    "join several with + to switch them together)"
                )
    if args.profile is not None and args.profile not in ARMS:
        ap.error(f"--profile: unknown arm {args.profile!r} (choose from {', '.join(ARMS)})")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    if not os.path.isfile(args.config):
        ap.error(f"--config: {args.config} does not exist")
    return args, ap


def write_synthetic_data(root: Path, vocab: int, num_tokens: int, seed: int) -> tuple[Path, Path]:
    """(tokenizer.json, dataset prefix): a WordLevel tokenizer of `vocab` ids ("<|endoftext|>" = 0) and
    random documents of 4096 tokens, through megatron's IndexedDatasetBuilder."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    words = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    prefix = root / "synthetic_text_document"
    dtype = np.int32
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    rng = np.random.default_rng(seed)
    doc = 4096
    for _ in range(max(2, -(-num_tokens // doc))):
        ids = rng.integers(3, vocab, size=doc, dtype=dtype)
        ids[-1] = 0  # end of document
        import torch

        builder.add_document(torch.from_numpy(ids), [doc])
    builder.finalize(str(prefix) + ".idx")
    return tok_dir / "tokenizer.json", prefix


def base_config(args, data_tok: Path, data_prefix: Path, extra: list):
    from mtpd_megatron.config.load import load_config, read_yaml

    raw = read_yaml(args.config)
    over = [
        f"data.tokenizer={data_tok}",
        f"data.paths=[{data_prefix}]",
        "data.split=100,0,0",
        "data.num_workers=0",
        f"data.cache_dir={data_prefix.parent / 'cache'}",
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.expert_model_parallel_size=1",
        "parallel.context_parallel_size=1",
        "parallel.sequence_parallel=false",
        "parallel.expert_tensor_parallel_size=null",
        f"training.train_iters={args.warmup + args.steps + 2}",
        "training.lr_warmup_iters=1",
        "training.eval_interval=0",
        f"training.device={args.device}",
        "checkpoint.save=null",
        "checkpoint.load=null",
        f"model.init_on_device={'false' if args.init == 'cpu' else 'true'}",
        "logging.progress_bar=off",
        "logging.log_interval=1000000",
        "logging.tensorboard_dir=null",
        "logging.wandb_project=null",
    ]
    if args.layers is not None:
        over.append(f"model.num_layers={args.layers}")
        freq = (raw.get("model", {}).get("moe") or {}).get("layer_freq")
        if isinstance(freq, list):
            over.append(f"model.moe.layer_freq=[{','.join(str(x) for x in freq[: args.layers])}]")
    if (raw.get("model") or {}).get("vocab_size") is None:
        over.append(f"model.vocab_size={DEFAULT_VOCAB}")
    return load_config(args.config, [*over, *extra, *args.overrides])


def runs_to_do(args) -> list[tuple[str, str, list]]:
    """(name, arm, overrides) for every run, arms first (the baselines), then each switch off/on."""
    runs = [(arm, arm, ARM_OVERRIDES[arm]) for arm in args.arms]
    if args.compare and "mtpd" not in args.arms:
        runs.append(("mtpd", "mtpd", ARM_OVERRIDES["mtpd"]))
    for item in args.compare:  # "a+b": a and b switched together
        names = item.split("+")
        runs.append((f"mtpd+{item}=off", "mtpd", [SWITCHES[n][1] for n in names]))
        runs.append((f"mtpd+{item}=on", "mtpd", [SWITCHES[n][0] for n in names]))
    return runs


def effective(cfg):
    """The config as it runs: model.moe.experts_backend resolved (auto -> grouped/sequential), so that a
    --compare run identical to the MTP-D baseline is recognised and not run twice."""
    from dataclasses import replace

    from mtpd_megatron.model.grouped_experts import resolve_experts_backend
    from mtpd_megatron.model.specs import resolve_backend

    moe = cfg.model.moe
    resolved = resolve_experts_backend(moe.experts_backend, resolve_backend(cfg.model.attention_backend))
    if not moe.num_experts:  # a dense model has no experts to choose for
        resolved = "none"
    return replace(cfg, model=replace(cfg.model, moe=replace(moe, experts_backend=resolved)))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grouped_check(model, device) -> dict | None:
    """One MoE layer's experts: torch grouped_mm (or the CPU loop) against megatron's SequentialMLP loop."""
    import torch

    from mtpd_megatron.model.grouped_experts import GroupedGemmExperts, grouped_mm_available

    experts = next((m for m in model.modules() if isinstance(m, GroupedGemmExperts)), None)
    if experts is None:
        return None
    dtype = next(experts.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(0)
    n_exp = experts.num_local_experts
    counts = torch.randint(0, 64, (n_exp,), generator=gen, device=device)
    counts[0] = 0  # one expert without tokens
    tokens = int(counts.sum())
    hidden = experts.config.hidden_size
    x = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    probs = torch.rand(tokens, generator=gen, device=device, dtype=torch.float32)
    with torch.no_grad():
        got, _ = experts(x, counts.cpu() if device.type == "cpu" else counts, probs)
        ref, _ = experts.reference_forward(x, counts, probs)
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    return {
        "grouped_mm": grouped_mm_available(x.device, x.dtype),
        "dtype": str(dtype),
        "tokens": tokens,
        "max_abs_diff": diff,
        "max_abs_ref": scale,
    }


def run_one(name: str, arm: str, cfg, tokenizer, device, args, out: Path) -> dict:
    import torch

    from mtpd_megatron.logging_utils import flops_per_token, peak_tflops
    from mtpd_megatron.trainer import Trainer

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    built = time.perf_counter()
    trainer = Trainer(cfg, tokenizer, device, resume="none")
    _progress(f"{name}: trainer built in {time.perf_counter() - built:.1f} s")
    try:
        times, losses = [], []
        for step in range(args.warmup + args.steps):
            _sync(device)
            start = time.perf_counter()
            result = trainer.train_step()
            _sync(device)
            took = time.perf_counter() - start
            if step >= args.warmup:
                times.append(took)
            losses.append(result.loss)
            _progress(
                f"{name}: step {step + 1}/{args.warmup + args.steps} {1e3 * took:.0f} ms loss {result.loss:.4f}"
                + (" (warm-up)" if step < args.warmup else "")
            )
        heads = trainer._head_metrics()  # per-head CE / KL / acceptance over the run's steps (the hook's sums)
        profile_file = None
        if args.profile == arm and name == arm:
            profile_file = str(out / f"profile_{arm}.txt")
            profile_step(trainer, device, profile_file)
        check = grouped_check(trainer.model[0], device) if cfg.model.moe.num_experts else None
        step_s = sum(times) / len(times)
        tokens = cfg.training.global_batch_size * cfg.data.seq_length
        tps = tokens / step_s
        fpt = flops_per_token(cfg, trainer.vocab_size)
        tflops = tps * fpt / 1e12
        peak = peak_tflops(device)
        return {
            "name": name,
            "arm": arm,
            "step_ms": 1e3 * step_s,
            "step_ms_each": [1e3 * t for t in times],
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "allocated_at_start_gib": start_gib,
            "flops_per_token": fpt,
            "losses": losses,
            "heads": heads,
            "profile": profile_file,
            "grouped_check": check,
            "num_layers": cfg.model.num_layers,
            "mtp_heads": cfg.mtp.num_heads,
            "mtpd": bool(cfg.mtp.num_heads and cfg.mtp.mtpd.enabled),
        }
    finally:
        with contextlib.suppress(Exception):
            trainer.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_step(trainer, device, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        trainer.train_step()
        _sync(device)
    averages = prof.key_averages()
    sections = []
    sorts = ("self_device_time_total", "device_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for sort in sorts:  # kernels by their own time first, then operators including their children
        try:
            table = averages.table(sort_by=sort, row_limit=40, max_name_column_width=80)
        except (AttributeError, KeyError):  # older torch names the device columns cuda_*
            sort = sort.replace("device", "cuda")
            table = averages.table(sort_by=sort, row_limit=40, max_name_column_width=80)
        sections.append(f"# one train_step, key averages sorted by {sort}\n{table}\n")
    Path(path).write_text("\n".join(sections))


def _progress(message: str) -> None:
    """One line per stage on stderr (the table stays on stdout): where a run's time goes, before it ends."""
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli("bench_train.py", _main, argv, cleanup=shutdown_distributed)


def _main(argv=None) -> int:
    args, ap = parse_args(argv)
    out = Path(args.out)
    import torch

    from mtpd_megatron.cli import source_commit
    from mtpd_megatron.config.load import ConfigError
    from mtpd_megatron.config.validate import validate
    from mtpd_megatron.data import load_tokenizer
    from mtpd_megatron.parallel import launch

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        try:
            probe = base_config(args, tmp / "tok" / "tokenizer.json", tmp / "synthetic_text_document", [])
            validate(probe, 1, environment=False)
            for _name, arm, extra in runs_to_do(args):  # every run's config, arm overrides included
                validate(
                    base_config(
                        args,
                        tmp / "tok" / "tokenizer.json",
                        tmp / "synthetic_text_document",
                        [*ARM_OVERRIDES[arm], *extra],
                    ),
                    1,
                    environment=False,
                )
        except ConfigError as err:
            ap.error(str(err))
        vocab = probe.model.vocab_size
        t = probe.training
        needed = (args.warmup + args.steps + 3) * t.global_batch_size * (probe.data.seq_length + 1)
        device = launch.init_distributed(probe, launch.read_env())
        began = time.perf_counter()
        tok_path, prefix = write_synthetic_data(tmp, vocab, needed, probe.training.seed)
        _progress(f"synthetic data ({needed} tokens, vocabulary {vocab}) in {time.perf_counter() - began:.1f} s")
        tokenizer = load_tokenizer(tok_path)
        out.mkdir(parents=True, exist_ok=True)
        results, done = [], {}  # done: effective config -> name of the run that measured it
        summary = {
            "config": args.config,
            "layers": probe.model.num_layers,
            "seq_length": probe.data.seq_length,
            "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "commit": source_commit(),
            "data": "synthetic uniform random tokens",
            "overrides": args.overrides,
            "runs": results,
        }
        for name, arm, extra in runs_to_do(args):
            cfg = base_config(args, tok_path, prefix, [*ARM_OVERRIDES[arm], *extra])
            key = repr(effective(cfg))
            if key in done:  # e.g. a switch's off run when off is the default: the baseline already measured it
                twin = next(r for r in results if r["name"] == done[key])
                results.append(dict(twin, name=name, same_run_as=twin["name"]))
                print(f"{name:34s} = {twin['name']} (same configuration)", flush=True)
                continue
            launch.set_seed(cfg.training.seed)
            res = run_one(name, arm, cfg, tokenizer, device, args, out)
            done[key] = name
            results.append(res)
            (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")  # kept if a later run dies
            print(
                f"{name:34s} step {res['step_ms']:9.1f} ms  {res['tokens_per_s']:10.4g} tok/s  "
                f"{res['tflops']:8.4g} TFLOP/s  MFU {_fmt(res['mfu'], '.1%')}  peak {_fmt(res['peak_gib'], '.1f')} GiB  "
                f"loss[0] {res['losses'][0]:.5f}",
                flush=True,
            )
            if res["grouped_check"]:
                print(f"{'':34s} grouped experts vs SequentialMLP: {res['grouped_check']}", flush=True)
        base = {r["arm"]: r for r in results if r["name"] == r["arm"]}
        if "nomtp" in base:
            for r in results:
                r["step_time_vs_nomtp"] = r["step_ms"] / base["nomtp"]["step_ms"]
                if r["peak_gib"] is not None:
                    r["peak_gib_vs_nomtp"] = r["peak_gib"] - base["nomtp"]["peak_gib"]
        (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out / 'bench.json'}", flush=True)
        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
