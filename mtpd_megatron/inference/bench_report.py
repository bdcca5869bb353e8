"""Markdown tables of a `tools/bench_decode.py` result JSON (every table carries the model's main-head loss).

Kept apart from the measuring code so that a result file can be re-rendered without a GPU:
`python -c "import json,sys; from mtpd_megatron.inference.bench_report import markdown_report as m;
print(m(json.load(open(sys.argv[1]))))" result.json`.
"""

from __future__ import annotations


def _f(value, fmt="{:.2f}"):
    if value is None:
        return ""
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def _mode_table(title: str, rows: list) -> list:
    """Rows of decoders against one greedy run (`mode` names each): adaptive drafting, draft vocabularies."""
    out = [
        f"## {title}\n",
        "| mode | tokens/step | drafts proposed/step | step ms | speedup (decode x) | identical | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        out.append(
            f"| {a['mode']} | {_f(a.get('tokens_per_step'))} | {_f(a.get('mean_proposed'))} | "
            f"{_f(a.get('step_ms'), '{:.3f}')} | {_f(a.get('speedup'))} ({_f(a.get('decode_speedup'))}) | "
            f"{a.get('greedy_matching', '')} | {a.get('error', '')[:120]} |"
        )
    return out + [""]


def markdown_report(r: dict) -> str:
    loss = r.get("main_loss")
    head = (
        f"{r.get('device')}, {r.get('dtype')}, {r.get('prompts')} prompts x {r.get('new_tokens')} new tokens, "
        f"repeats {r.get('repeats')}, source {r.get('source')}; main-head validation loss "
        f"{_f(loss, '{:.4f}') or 'n/a'} ({r.get('main_loss_source')}); base options {r.get('options')}"
    )
    out = [f"# Decoding benchmark\n\n{head}\n"]
    g = r["greedy"]
    out += [
        "## Greedy vs fixed K (batch 1)\n",
        "| | main loss | tok/s | tokens/step | step ms | step cost | speedup (decode x) | identical |",
        "|---|---|---|---|---|---|---|---|",
        f"| greedy | {_f(loss, '{:.4f}')} | {_f(g['tokens_per_second'], '{:.1f}')} | 1 | {_f(g['step_ms'])} | 1 | 1 | "
        f"{g['matching_prompts']}/{r['prompts']} |",
    ]
    for s in r["speculative"]:
        out.append(
            f"| K={s['k']} | {_f(loss, '{:.4f}')} | {_f(s['tokens_per_second'], '{:.1f}')} | "
            f"{_f(s['tokens_per_step'])} | {_f(s['step_ms'])} | {_f(s['step_cost_vs_greedy'])}x | "
            f"{_f(s['speedup'])}x ({_f(s['decode_speedup'])}x) | {s['matching_prompts']}/{r['prompts']} |"
        )
    hf = r.get("hf_generate")
    if hf:
        out.append(
            f"| transformers generate (HF export) | {_f(loss, '{:.4f}')} | {_f(hf['tokens_per_second'], '{:.1f}')} "
            f"| 1 | | | {_f(hf['seconds'] and g['seconds'] / hf['seconds'])}x | {hf['matching_prompts']}/{r['prompts']} |"
        )
    out.append("")
    if r.get("profile"):
        from mtpd_megatron.inference.profile import summary_markdown

        out += ["## Profile of one step (ms per step)\n", summary_markdown(r["profile"])]
    if r.get("ablation"):
        k = r["main_k"]
        out += [
            f"## Switch ablation (greedy and K={k}, batch 1; main loss {_f(loss, '{:.4f}')})\n",
            f"| switch | greedy step ms (vs baseline) | K={k} step ms (vs baseline) | K={k} step cost vs greedy "
            "| tokens equal baseline greedy (greedy / K) | error |",
            "|---|---|---|---|---|---|",
        ]
        for a in r["ablation"]:
            err = a.get("greedy_error") or a.get(f"k{k}_error") or ""
            out.append(
                f"| {a['switch']} | {_f(a.get('greedy_step_ms'), '{:.3f}')} ({_f(a.get('greedy_step_vs_baseline'))}) "
                f"| {_f(a.get(f'k{k}_step_ms'), '{:.3f}')} ({_f(a.get(f'k{k}_step_vs_baseline'))}) | "
                f"{_f(a.get(f'k{k}_step_cost_vs_greedy'))} | {a.get('greedy_matching_baseline_greedy', '')} / "
                f"{a.get(f'k{k}_matching_baseline_greedy', '')} | {err[:120]} |"
            )
        out.append("")
    for key, title in (
        ("adaptive", "Fixed K vs adaptive draft length"),
        ("draft_vocab", f"K={r.get('main_k')} with a frequency-ranked draft vocabulary"),
    ):
        if r.get(key):
            out += _mode_table(f"{title} (main loss {_f(loss, '{:.4f}')})", r[key])
    e = r.get("exact")
    if e:
        fast, exact, spec = e["fast_greedy"], e["exact_greedy"], e["speculative"]
        out += [
            f"## Exact greedy (verify-shaped, {e['k'] + 1} positions per step; main loss {_f(loss, '{:.4f}')})\n",
            "| decoder | step ms | tok/s | prompts differing from fast greedy | from exact greedy |",
            "|---|---|---|---|---|",
            f"| fast greedy (1 position) | {_f(fast['step_ms'], '{:.3f}')} | {_f(fast['tokens_per_second'], '{:.1f}')} | 0 | |",
            f"| exact greedy | {_f(exact['step_ms'], '{:.3f}')} ({_f(e['exact_greedy_cost_vs_fast'])}x) | "
            f"{_f(exact['tokens_per_second'], '{:.1f}')} | {r['prompts'] - exact['fast_greedy_matching']} | 0 |",
            f"| K={e['k']} | {_f(spec['step_ms'], '{:.3f}')} | {_f(spec['tokens_per_second'], '{:.1f}')} | "
            f"{e['speculative_mismatches_vs_fast_greedy']} | {e['speculative_mismatches_vs_exact_greedy']} |",
            "",
        ]
    if r.get("batches"):
        out += [
            f"## Batch > 1 (K={r['main_k']}, ragged acceptance; main loss {_f(loss, '{:.4f}')})\n",
            "| batch | greedy tok/s | K tok/s | tokens/step | speedup | samples equal to greedy at that batch | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in r["batches"]:
            if "error" in b:
                out.append(f"| {b['batch']} | | | | | | {b['error'][:120]} |")
                continue
            s = b["speculative"]
            out.append(
                f"| {b['batch']} | {_f(b['greedy']['tokens_per_second'], '{:.1f}')} | "
                f"{_f(s['tokens_per_second'], '{:.1f}')} | {_f(s['tokens_per_step'])} | {_f(b['speedup'])}x | "
                f"{s['greedy_same_batch_matching']}/{b['samples']} | |"
            )
        out.append("")
    return "\n".join(out) + "\n"
