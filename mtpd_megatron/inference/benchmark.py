"""Decoding benchmark core: greedy vs self-speculative decoding of one model on the same prompts, and the
ablations of issue 12 (each `DecodeOptions` switch on vs off, fixed K vs adaptive draft length, exact greedy,
batch > 1), every row measured in the same process as its greedy baseline.

Used by `tools/bench_decode.py` and the experiment harness. Every row runs in the same decoder
(inference/decoder.py); a row differs from its baseline only in the options it names.
"""

from __future__ import annotations

import statistics
from typing import Optional

from mtpd_megatron.inference.options import ABLATION_SWITCHES, DecodeOptions


def first_difference(a: list, b: list):
    """Index of the first token where two generations differ (None when equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _groups(prompts: list, batch: int) -> list:
    """Prompts in batches of `batch` (cycled when there are fewer prompts than one batch)."""
    if batch >= len(prompts):
        return [[prompts[i % len(prompts)] for i in range(batch)]]
    return [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]


def run_decoder(
    model,
    prompts: list,
    k: int,
    new_tokens: int,
    options: DecodeOptions,
    *,
    repeats: int = 1,
    vocab_limit=None,
    batch: int = 1,
    eos_id: Optional[int] = None,
    token_ranking=None,
) -> dict:
    """Decode every batch of prompts (batch 1 = each prompt alone) `repeats` times; keep the median run of each.

    Returns the pooled figures and the per-sample tokens (`tokens`, in the order of the batches).
    """
    import torch

    from mtpd_megatron.inference.decoder import SpeculativeDecoder

    cuda = next(model.parameters()).is_cuda
    groups = _groups(prompts, batch)
    length = max(len(p) for p in prompts) + new_tokens
    dec = SpeculativeDecoder(
        model, k=k, max_length=length, vocab_limit=vocab_limit, options=options, token_ranking=token_ranking
    )
    warmup = dec.generate(groups[0], new_tokens, eos_id=eos_id)  # graph capture and compile: not in the figures
    seconds, decode_seconds, tokens, steps, accepted, proposed, depth_runs = [], [], [], 0, [], [], None
    for group in groups:
        runs = [dec.generate(group, new_tokens, eos_id=eos_id) for _ in range(repeats)]
        times = [r.seconds for r in runs]
        best = runs[times.index(statistics.median_low(times))]
        seconds.append(best.seconds)
        decode_seconds.append(best.seconds - best.prefill_seconds)
        tokens += best.tokens
        steps += max(best.steps)  # a batch advances together: its steps are those of its slowest sample
        accepted += [a for acc in best.accepted for a in acc]
        proposed += [d for ds in best.proposed for d in ds]
        if best.depth_runs:
            depth_runs = [x + y for x, y in zip(depth_runs, best.depth_runs)] if depth_runs else list(best.depth_runs)
    n_tokens = sum(len(t) for t in tokens)
    out = {
        "k": k,
        "batch": batch,
        "options": options.as_dict(),
        "seconds": sum(seconds),
        "decode_seconds": sum(decode_seconds),
        "warmup_seconds": warmup.seconds,  # the first call: CUDA-graph capture, and torch.compile with `compile`
        "new_tokens": n_tokens,
        "tokens_per_second": n_tokens / sum(seconds),
        "decode_tokens_per_second": (n_tokens - len(tokens)) / sum(decode_seconds),
        "steps": steps,
        "tokens_per_step": (sum(accepted) + len(accepted)) / len(accepted) if accepted else None,
        "step_ms": 1000 * sum(decode_seconds) / steps if steps else None,
        "per_position_acceptance": [sum(a >= j for a in accepted) / len(accepted) for j in range(1, k + 1)]
        if accepted
        else [],
        "mean_proposed": sum(proposed) / len(proposed) if proposed and k else None,
        "depth_runs": depth_runs,
        "tokens": tokens,
    }
    if cuda and options.cuda_graphs and not options.per_phase and not options.compile:  # state frozen after the run
        out.update(phase_times(dec))
    del dec
    if cuda:
        torch.cuda.empty_cache()
    return out


def compare(row: dict, reference: list, name: str) -> None:
    """Add `<name>_first_difference` / `<name>_matching` (prompts equal to `reference`) to `row`."""
    diffs = [first_difference(a, b) for a, b in zip(row["tokens"], reference)]
    row[f"{name}_first_difference"] = diffs
    row[f"{name}_matching"] = sum(d is None for d in diffs)


def _relative(row: dict, greedy: dict) -> dict:
    row["speedup"] = greedy["seconds"] / row["seconds"]
    row["decode_speedup"] = greedy["decode_seconds"] / row["decode_seconds"]
    row["step_cost_vs_greedy"] = row["step_ms"] / greedy["step_ms"] if row["step_ms"] and greedy["step_ms"] else None
    return row


def _strip(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "tokens"}


def bench(
    model,
    prompts: list,
    ks: list,
    new_tokens: int,
    *,
    repeats: int = 3,
    cuda_graphs: bool = True,
    vocab_limit=None,
    fp32_logits: bool = False,
    options: Optional[DecodeOptions] = None,
) -> tuple:
    """Time greedy (k=0) and each k on every prompt at batch 1; return (per-k summary, greedy tokens)."""
    cuda = next(model.parameters()).is_cuda
    options = options or DecodeOptions(cuda_graphs=cuda_graphs and cuda, fp32_logits=fp32_logits)
    rows = {}
    for k in [0, *ks]:
        rows[k] = run_decoder(model, prompts, k, new_tokens, options, repeats=repeats, vocab_limit=vocab_limit)
        compare(rows[k], rows[0]["tokens"], "greedy")
        rows[k]["first_difference"] = rows[k]["greedy_first_difference"]
        rows[k]["matching_prompts"] = rows[k]["greedy_matching"]
        rows[k]["identical_to_greedy"] = rows[k]["matching_prompts"] == len(prompts)
    reference = rows[0]["tokens"]
    return {"greedy": _strip(rows[0]), "speculative": [_strip(_relative(rows[k], rows[0])) for k in ks]}, reference


def _safely(fn, *args, **kwargs) -> dict:
    """One benchmark row; a failure (e.g. torch.compile on an unsupported op) is recorded, not fatal."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 -- the row says what failed; the other rows still run
        return {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"}


def bench_ablation(
    model,
    prompts: list,
    k: int,
    new_tokens: int,
    base: DecodeOptions,
    *,
    switches=None,
    repeats: int = 1,
    vocab_limit=None,
    on_row=None,
) -> list:
    """Greedy and K-draft step cost with each switch of ABLATION_SWITCHES on, beside the baseline (all off).

    `on_row(rows)` is called after every row (the tool saves its JSON there)."""
    cuda = next(model.parameters()).is_cuda
    names = list(ABLATION_SWITCHES) if switches is None else list(switches)
    if not cuda:
        # The compiled switches are measured on CUDA only (inductor on CPU: minutes, not the target).
        names = [n for n in names if not ABLATION_SWITCHES[n].get("compile")]
    variants = [("baseline", base)] + [(n, base.with_(**ABLATION_SWITCHES[n])) for n in names]
    rows, reference = [], None
    for name, opts in variants:
        greedy = _safely(run_decoder, model, prompts, 0, new_tokens, opts, repeats=repeats, vocab_limit=vocab_limit)
        spec = _safely(run_decoder, model, prompts, k, new_tokens, opts, repeats=repeats, vocab_limit=vocab_limit)
        if reference is None and "tokens" in greedy:
            reference = greedy["tokens"]
        row = {"switch": name, "options": opts.as_dict()}
        for label, r in (("greedy", greedy), (f"k{k}", spec)):
            if "error" in r:
                row[f"{label}_error"] = r["error"]
                continue
            compare(r, reference, "baseline_greedy")
            row.update(
                {
                    f"{label}_step_ms": r["step_ms"],
                    f"{label}_tokens_per_second": r["tokens_per_second"],
                    f"{label}_matching_baseline_greedy": r["baseline_greedy_matching"],
                    f"{label}_tokens_per_step": r["tokens_per_step"],
                }
            )
        if row.get("greedy_step_ms") and row.get(f"k{k}_step_ms"):
            row[f"k{k}_step_cost_vs_greedy"] = row[f"k{k}_step_ms"] / row["greedy_step_ms"]
        for label in ("greedy", f"k{k}"):
            first = rows[0] if rows else row
            if row.get(f"{label}_step_ms") and first.get(f"{label}_step_ms"):
                row[f"{label}_step_vs_baseline"] = row[f"{label}_step_ms"] / first[f"{label}_step_ms"]
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def bench_adaptive(
    model,
    prompts: list,
    k: int,
    thresholds: list,
    new_tokens: int,
    base: DecodeOptions,
    *,
    fixed: Optional[list] = None,
    repeats: int = 1,
    vocab_limit=None,
) -> list:
    """Fixed K = 1..k and adaptive drafting (threshold P, up to k heads), each against the same greedy run."""
    configs = [(f"fixed K={j}", j, base, {"threshold": base.draft_threshold}) for j in (fixed or range(1, k + 1))]
    configs += [(f"adaptive P={p} (K<={k})", k, base.with_(draft_threshold=p), {"threshold": p}) for p in thresholds]
    return _against_greedy(model, prompts, new_tokens, base, configs, repeats=repeats, vocab_limit=vocab_limit)


def bench_draft_vocab(
    model,
    prompts: list,
    k: int,
    sizes: list,
    new_tokens: int,
    base: DecodeOptions,
    token_ranking,
    *,
    repeats: int = 1,
    vocab_limit=None,
) -> list:
    """K drafts over the whole vocabulary and over each draft vocabulary size (the most frequent ids of
    `token_ranking`, DecodeOptions.draft_vocab), each against the same greedy run."""
    configs = [
        (f"K={k}, draft vocab {size or 'all'}", k, base.with_(draft_vocab=size), {"draft_vocab": size})
        for size in [0, *sizes]
    ]
    return _against_greedy(
        model, prompts, new_tokens, base, configs, repeats=repeats, vocab_limit=vocab_limit, token_ranking=token_ranking
    )


def _against_greedy(
    model, prompts: list, new_tokens: int, base: DecodeOptions, configs: list, *, repeats, vocab_limit, **decoder
) -> list:
    """A greedy run, then each (mode, k, options, extra fields) decoder against it (a failing row records its
    error); `decoder` goes to every run_decoder call of the configs."""
    greedy = run_decoder(model, prompts, 0, new_tokens, base, repeats=repeats, vocab_limit=vocab_limit)
    rows = [dict(_strip(greedy), mode="greedy")]
    for mode, k, opts, extra in configs:
        r = _safely(
            run_decoder, model, prompts, k, new_tokens, opts, repeats=repeats, vocab_limit=vocab_limit, **decoder
        )
        if "error" not in r:
            compare(r, greedy["tokens"], "greedy")
            r = _strip(_relative(r, greedy))
        rows.append(dict(r, mode=mode, k=k, **extra))
    return rows


def bench_exact(
    model, prompts: list, k: int, new_tokens: int, base: DecodeOptions, *, repeats: int = 1, vocab_limit=None
) -> dict:
    """Fast greedy (1 position per step), exact greedy (k+1 positions, the verify's kernels) and K drafts.

    Counts the prompts whose speculative tokens differ from each greedy, and the cost of the exact greedy.
    """
    fast = run_decoder(model, prompts, 0, new_tokens, base, repeats=repeats, vocab_limit=vocab_limit)
    exact = run_decoder(
        model, prompts, 0, new_tokens, base.with_(verify_width=k + 1), repeats=repeats, vocab_limit=vocab_limit
    )
    spec = run_decoder(model, prompts, k, new_tokens, base, repeats=repeats, vocab_limit=vocab_limit)
    for row in (exact, spec):
        compare(row, fast["tokens"], "fast_greedy")
    compare(spec, exact["tokens"], "exact_greedy")
    _relative(spec, fast)
    _relative(exact, fast)
    return {
        "k": k,
        "fast_greedy": _strip(fast),
        "exact_greedy": _strip(exact),
        "speculative": _strip(spec),
        "speculative_mismatches_vs_fast_greedy": len(prompts) - spec["fast_greedy_matching"],
        "speculative_mismatches_vs_exact_greedy": len(prompts) - spec["exact_greedy_matching"],
        "exact_greedy_cost_vs_fast": exact["step_ms"] / fast["step_ms"] if fast["step_ms"] else None,
        "speedup_vs_exact_greedy": exact["seconds"] / spec["seconds"],
    }


def bench_batches(
    model,
    prompts: list,
    k: int,
    batches: list,
    new_tokens: int,
    base: DecodeOptions,
    *,
    repeats: int = 1,
    vocab_limit=None,
    reference: Optional[list] = None,
) -> list:
    """Greedy and K-draft tokens/s at each batch size (ragged acceptance), speedup at the same batch."""
    rows = []
    for b in batches:
        greedy = _safely(
            run_decoder, model, prompts, 0, new_tokens, base, repeats=repeats, vocab_limit=vocab_limit, batch=b
        )
        spec = _safely(
            run_decoder, model, prompts, k, new_tokens, base, repeats=repeats, vocab_limit=vocab_limit, batch=b
        )
        row = {"batch": b, "k": k}
        if "error" in greedy or "error" in spec:
            row["error"] = greedy.get("error") or spec.get("error")
            rows.append(row)
            continue
        compare(spec, greedy["tokens"], "greedy_same_batch")
        if reference is not None:  # batch-1 greedy of the same prompts (cycled like the batches)
            cycled = [reference[prompts.index(p)] for g in _groups(prompts, b) for p in g]
            compare(spec, cycled, "greedy_batch1")
            compare(greedy, cycled, "greedy_batch1")
        _relative(spec, greedy)
        row.update(
            greedy=_strip(greedy), speculative=_strip(spec), speedup=spec["speedup"], samples=len(spec["tokens"])
        )
        rows.append(row)
    return rows


def phase_times(decoder, iters: int = 200) -> dict:
    """Milliseconds of each half of a decoding step (verify, draft), each captured in its own CUDA graph.

    Call after a finished generation (state frozen, see SpeculativeDecoder.step_phases); the graphs are
    replayed `iters` times back to back and timed with CUDA events.
    """
    import torch

    from mtpd_megatron.inference.kv_cache import cached_attention

    out = {}
    with torch.no_grad(), cached_attention(decoder.model, decoder.state):
        for name, fn in decoder.step_phases().items():
            out[f"{name}_ms"] = replay_ms(fn, iters)
    return out


def replay_ms(fn, iters: int = 200) -> float:
    """Capture `fn` in a CUDA graph (after two warm-up calls on the capture stream) and time its replays."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()  # warm-up on the capture stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
