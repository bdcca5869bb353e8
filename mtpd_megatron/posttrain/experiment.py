"""The domain-shift experiment: what fine-tuning on a new domain does to the heads' acceptance, per head treatment.

From one pretrained export (prose), the same fine-tune of the main model on a different offline domain (by
default CPython's standard library sources, tokenised with the export's own tokenizer) is run once per head
treatment: `frozen` (heads kept as exported: what a stock fine-tune + tools/attach_mtp_heads.py gives),
`ce` (heads trained on their CE only) and `mtpd` (CE + beta TopN KL to the detached main head). Same data
order, steps, learning rate and seed in every arm. Each written export is reloaded and scored on the same
held-out documents of the new domain: main-head loss beside a_k / CAR_k / tau, plus the export before the
fine-tune (`pretrained`) as the reference. Outputs: results.json, results.md (a table for docs/results.md)
and acceptance.png (evaluation.plot_acceptance).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

ARMS = ("frozen", "ce", "mtpd")
NOTES = {
    "pretrained": "the export before the fine-tune",
    "frozen": "heads frozen (main model fine-tuned)",
    "ce": "heads trained with CE only",
    "mtpd": "heads trained with MTP-D (CE + beta TopN KL)",
}


def run_experiment(base, out: Path, arms: Sequence[str] = ARMS, *, commit: Optional[str] = None) -> dict:
    """`base` is a PosttrainConfig (model.path = the pretrained export); every arm overrides heads and out."""
    import torch

    from mtpd_megatron.posttrain.config import validate_posttrain
    from mtpd_megatron.posttrain.data import load_domain
    from mtpd_megatron.posttrain.evaluate import evaluate_export
    from mtpd_megatron.posttrain.finetune import finetune, resolve_device, resolve_dtype

    configs = {}
    for arm in arms:
        cfg = dataclasses.replace(
            base,
            heads=arm,
            out=str(out / arm / "export"),
            name=arm,
            overwrite=True,
            mtp=dataclasses.replace(
                base.mtp, mtpd=dataclasses.replace(base.mtp.mtpd, enabled=arm == "mtpd" or base.mtp.mtpd.enabled)
            ),
        )
        validate_posttrain(cfg)
        configs[arm] = cfg
    device = resolve_device(base)
    dtype = resolve_dtype(base, device)
    t0 = time.perf_counter()
    data = load_domain(base.data, Path(base.model.path) / "tokenizer.json", seed=base.training.seed)
    print(
        f"domain: {data.documents['train']} training / {data.documents['valid']} held-out documents, "
        f"{data.tokens['train']:,} / {data.tokens['valid']:,} tokens ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    results = [
        evaluate_export(
            base.model.path,
            data.valid,
            batch_size=base.training.eval_batch_size,
            device=device,
            dtype=dtype,
            label="pretrained",
        )
    ]
    results[0].update(arm="pretrained", note=NOTES["pretrained"])
    records = {}
    for arm in arms:
        record = finetune(configs[arm], data=data)
        records[arm] = record
        r = dict(
            record["eval"],
            arm=arm,
            note=NOTES[arm],
            train_seconds=record["train_seconds"],
            draft=record["draft"],
            final_log=record["log"][-1] if record["log"] else None,
        )
        results.append(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    first = records[arms[0]]
    result = {
        "experiment": "posttrain domain shift",
        "commit": commit,
        "export": str(Path(base.model.path).absolute()),
        "device": first["device"],
        "dtype": first["dtype"],
        "deepspeed": first["deepspeed"],
        "zero_stage": base.deepspeed.zero_stage,
        "world_size": first["world_size"],
        "config": first["config"],
        "data": {
            **first["data"],
            "split": "held-out documents of the new domain",
            "sequences": int(len(data.valid)),
            "seq_length": base.data.seq_length,
        },
        "checkpoints": results,
    }
    return result


def table(result: dict) -> str:
    """Markdown table: one row per arm, main-head loss and its change from the pretrained export, tau, a_k."""
    rows = result["checkpoints"]
    k = max(len(r.get("a") or []) for r in rows)
    ref = rows[0]["main_loss"]
    head = (
        ["arm", "what", "main loss (new domain)", "vs pretrained", "tau"]
        + [f"a_{i}" for i in range(1, k + 1)]
        + [f"CAR_{k}", "reload + draft = greedy"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "" if r["arm"] == "pretrained" else f"{100 * (r['main_loss'] / ref - 1):+.2f}%"
        draft = r.get("draft")
        cells = (
            [r["arm"], r["note"], f"{r['main_loss']:.4f}", delta, f"{r['tau']:.3f}"]
            + [f"{x:.3f}" for x in r["a"]]
            + [f"{r['car'][-1]:.3f}", "" if draft is None else ("yes" if draft["equal"] else "NO")]
        )
        lines.append("| " + " | ".join(cells) + " |")
    d = result["data"]
    lines.append("")
    lines.append(
        f"{result['device']}, {result['dtype']}, DeepSpeed {result['deepspeed']} ZeRO-{result['zero_stage']} "
        f"on {result['world_size']} rank(s); {d['train_sequences']} training sequences available, "
        f"{result['config']['training']['train_iters']} steps x {result['config']['training']['micro_batch_size']}"
        f" x {d['seq_length']} tokens; scored on {d['sequences']} held-out sequences of {d['seq_length']} "
        f"tokens ({d['documents']['valid']} held-out documents); commit {result.get('commit') or 'unknown'}."
    )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> list:
    from mtpd_megatron.checkpoint.layout import write_atomic
    from mtpd_megatron.inference.evaluation import plot_acceptance

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "results.md", table(result))
    plot_acceptance(result, str(out / "acceptance.png"))
    return [out / "results.json", out / "results.md", out / "acceptance.png"]


def main(argv=None) -> int:
    from mtpd_megatron.cli import cli_parser
    from mtpd_megatron.posttrain.cli import overrides_of
    from mtpd_megatron.posttrain.config import ZERO_STAGES, ConfigError, load_posttrain_config

    p = cli_parser("run_posttrain_experiment.py", __doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="the pretrained export with MTP heads (model.path)")
    p.add_argument("--out", required=True, help="output directory: <arm>/export, results.{json,md}, acceptance.png")
    p.add_argument("--config", default=None, help="post-training YAML for every arm (configs/posttrain/*.yaml)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of head treatments ({', '.join(ARMS)})")
    p.add_argument("--zero-stage", type=int, default=None, choices=ZERO_STAGES, help="DeepSpeed ZeRO stage")
    p.add_argument("--train-iters", type=int, default=None, help="optimizer steps per arm")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="training.device")
    p.add_argument("--commit", default=None, help="commit recorded in the results")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every arm")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms or len(set(arms)) != len(arms):
        p.error(f"--arms {args.arms}: give distinct arms out of {', '.join(ARMS)}")
    args.model, args.heads, args.dtype, args.overwrite = args.export, None, None, False
    args.out_dir, args.out = Path(args.out), None
    overrides = overrides_of(args) + ["out=" + str(args.out_dir / arms[0] / "export")]
    base = load_posttrain_config(args.config, overrides)
    if base.model.path is None:
        raise ConfigError("--export: not set")
    result = run_experiment(base, args.out_dir, arms, commit=args.commit)
    for path in write_outputs(result, args.out_dir):
        print(path)
    print(table(result))
    return 0


def cli(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli("run_posttrain_experiment.py", main, argv, cleanup=shutdown_distributed)
