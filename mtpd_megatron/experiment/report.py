"""An experiment's results as one JSON, one markdown table and two plots, rebuilt from the arms' result files.

Every acceptance or speed figure sits beside the same model's main-head validation loss and its difference
to the reference arm (no MTP at equal tokens): acceptance bought with main-head quality is not a gain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mtpd_megatron.checkpoint.atomic import write_atomic, write_atomic_with
from mtpd_megatron.experiment.spec import Experiment


def collect(experiment: Experiment) -> list:
    """The result files that exist, in the experiment's arm order."""
    from mtpd_megatron.experiment.runner import read_result

    return [r for r in (read_result(a) for a in experiment.arms.values()) if r is not None]


def _vs_reference(result: dict, reference: Optional[dict]) -> Optional[float]:
    if reference is None:
        return None
    return result["main_loss"] / reference["main_loss"] - 1.0


def _decode_columns(result: dict, ks: list) -> tuple:
    """(tokens/step per K, best speedup, its K) from the arm's decoding run, or blanks."""
    dec = result.get("decode")
    if not dec:
        return ["" for _ in ks], "", ""
    by_k = {r["k"]: r for r in dec["speculative"]}
    steps = [f"{by_k[k]['tokens_per_step']:.2f}" if k in by_k else "" for k in ks]
    best = max(dec["speculative"], key=lambda r: r["speedup"])
    return steps, f"{best['speedup']:.2f}x", str(best["k"])


def _kl_gradient(result: dict) -> str:
    """'cos +0.04, 0.8x' = cosine of the heads' KL gradient with the main CE's at the trunk's last layer, and
    the KL gradient's norm relative to the main CE's ('0' when the KL does not reach the trunk)."""
    g = (result.get("gradients") or {}).get("last_layer") or {}
    if "head_kl_norm" not in g or not g.get("main_ce_norm"):
        return ""
    ratio = g["head_kl_norm"] / g["main_ce_norm"]
    if ratio == 0.0:
        return "0 (none reaches the trunk)"
    return f"cos {g['cos_main_ce_head_kl']:+.3f}, {ratio:.3f}x"


def table(experiment: Experiment, results: list) -> str:
    """Markdown: one row per arm."""
    ref = next((r for r in results if r["arm"] == experiment.reference), None)
    heads = max([len(r["a"] or []) for r in results if not r.get("extend")] + [0])
    ks = experiment.file.evaluation.decode.k
    head = (
        ["arm", "main loss", "vs " + (experiment.reference or "ref")]
        + [f"a_{k}" for k in range(1, heads + 1)]
        + [f"CAR_{heads}", "tau"]
        + [f"K={k} tok/step" for k in ks]
        + ["best wall-clock", "best K", "KL grad vs main (last layer)", "note"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("extend"):
            continue
        gap = _vs_reference(r, ref)
        a = r["a"] or []
        cells = [r["arm"], f"{r['main_loss']:.4f}", "" if gap is None else f"{100 * gap:+.2f}%"]
        cells += [f"{x:.3f}" for x in a[:heads]] + [""] * (heads - len(a[:heads]))
        cells += [f"{r['car'][heads - 1]:.3f}" if a and len(a) >= heads else "", f"{r['tau']:.3f}" if r["tau"] else ""]
        steps, best, best_k = _decode_columns(r, ks)
        cells += steps + [best, best_k, _kl_gradient(r), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    ext = [r for r in results if r.get("extend")]
    if ext:
        lines += ["", "Looped extensions (heads beyond the parent's; main model and the parent's heads frozen):", ""]
        lines += [
            "| arm | parent | heads | checkpoint | main loss | a_k of the new heads | tau |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ext:
            start = next(x for x in results if x["arm"] == r["extend"]["parent"])["num_heads"]
            for tag in ("copy", "trained"):
                e = r["evaluation"][tag]
                new = " ".join(f"{x:.3f}" for x in e["a"][start:])
                lines.append(
                    f"| {r['arm']} | {r['extend']['parent']} | {start}->{e['num_heads']} | "
                    f"{'training-free copy' if tag == 'copy' else 'trained stage'} | {e['main_loss']:.4f} | "
                    f"{new} | {e['tau']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def _plots(experiment: Experiment, results: list, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        if r.get("a") and not r.get("extend"):
            ax.plot(
                range(1, len(r["a"]) + 1),
                [100 * x for x in r["a"]],
                marker="o",
                label=f"{r['arm']} (loss {r['main_loss']:.3f})",
            )
    if ax.lines:
        ax.set_xlabel("head k")
        ax.set_ylabel("a_k (%)")
        ax.set_title(f"{experiment.name}: per-head acceptance (teacher-forced, held-out)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        fig.tight_layout()
        write_atomic_with(out / "acceptance.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        written.append(out / "acceptance.png")
    plt.close(fig)

    ref = next((r for r in results if r["arm"] == experiment.reference), None)
    points = [r for r in results if r.get("tau") and not r.get("extend")]
    if points:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for r in points:
            ax.scatter(r["main_loss"], r["tau"], s=25)
            ax.annotate(r["arm"], (r["main_loss"], r["tau"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if ref is not None:
            ax.axvline(ref["main_loss"], color="k", lw=0.8, label=f"{ref['arm']} (no MTP)")
            ax.axvspan(ref["main_loss"], ref["main_loss"] * 1.005, color="g", alpha=0.15, label="within +0.5%")
            ax.legend(fontsize=7)
        ax.set_xlabel("main-head validation loss (lower is better)")
        ax.set_ylabel("tau = 1 + sum CAR_k (higher is better)")
        ax.set_title(f"{experiment.name}: acceptance against the main head's quality")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_atomic_with(out / "loss_vs_tau.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        written.append(out / "loss_vs_tau.png")
        plt.close(fig)
    return written


def _provenance(results: list, key: str) -> str:
    """One value of `key` when every arm shares it; otherwise each value with the arms it holds for (arms of an
    imported results.json may come from another session's commit, date or card)."""
    groups: dict = {}
    for r in results:
        groups.setdefault(r[key], []).append(r["arm"])
    if len(groups) == 1:
        return str(next(iter(groups)))
    return "; ".join(
        f"{value} ({', '.join(arms)})" if len(arms) <= 3 else f"{value} ({len(arms)} arms)"
        for value, arms in groups.items()
    )


def write_report(experiment: Experiment) -> list:
    """results.json, results.md, acceptance.png, loss_vs_tau.png in the experiment directory (atomically)."""
    results = collect(experiment)
    if not results:
        return []
    out = experiment.out
    summary = {
        "experiment": experiment.name,
        "file": str(experiment.path),
        "reference": experiment.reference,
        "arms": results,
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    first = results[0]
    header = (
        f"# {experiment.name}\n\n{len(results)} arms, {first['tokens'] / 1e6:.2f}M tokens each (seed "
        f"{first['seed']}), {_provenance(results, 'device')}, commit {_provenance(results, 'commit')}, "
        f"{_provenance(results, 'date')}. Main loss = the main "
        f"head's validation loss on the same held-out sequences for every arm; a_k/CAR_k/tau teacher-forced "
        f"against the main head; K=k tok/step and wall-clock from real greedy-verified decoding.\n\n"
    )
    write_atomic(out / "results.md", header + table(experiment, results))
    return [out / "results.json", out / "results.md", *_plots(experiment, results, out)]
