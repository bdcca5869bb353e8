"""Batch-1 decoding benchmark core: greedy vs self-speculative decoding of one model on the same prompts.

Used by `tools/bench_decode.py` and the experiment harness. Both run in the same decoder
(inference/decoder.py) with the same optimisations (static KV cache, one CUDA graph per step on CUDA), so
the greedy row is the same-run baseline of every speculative row.
"""

from __future__ import annotations

import statistics


def first_difference(a: list, b: list):
    """Index of the first token where two generations differ (None when equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def bench(model, prompts: list, ks: list, new_tokens: int, *, repeats: int = 3, cuda_graphs: bool = True,
          vocab_limit=None, fp32_logits: bool = False) -> tuple:
    """Time greedy (k=0) and each k on every prompt at batch 1; return (per-k summary, greedy tokens)."""
    import torch

    from mtpd_megatron.inference.decoder import SpeculativeDecoder

    cuda = next(model.parameters()).is_cuda
    length = max(len(p) for p in prompts) + new_tokens
    out, reference = {}, None
    for k in [0, *ks]:
        dec = SpeculativeDecoder(model, k=k, max_length=length, vocab_limit=vocab_limit,
                                 cuda_graphs=cuda_graphs and cuda, fp32_logits=fp32_logits)
        dec.generate([prompts[0]], new_tokens)  # warm-up (and CUDA graph capture), not timed
        seconds, decode_seconds, tokens, steps, accepted = [], [], [], 0, []
        for p in prompts:
            runs = [dec.generate([p], new_tokens) for _ in range(repeats)]
            times = [r.seconds for r in runs]
            best = runs[times.index(statistics.median_low(times))]
            seconds.append(best.seconds)
            decode_seconds.append(best.seconds - best.prefill_seconds)
            tokens.append(best.tokens[0])
            steps += best.steps[0]
            accepted += best.accepted[0]
        if k == 0:
            reference = tokens
        n_tokens = sum(len(t) for t in tokens)
        differences = [first_difference(a, b) for a, b in zip(tokens, reference)]
        car = [sum(a >= j for a in accepted) / len(accepted) for j in range(1, k + 1)] if accepted else []
        out[k] = {
            "k": k,
            "seconds": sum(seconds),
            "decode_seconds": sum(decode_seconds),
            "new_tokens": n_tokens,
            "tokens_per_second": n_tokens / sum(seconds),
            "decode_tokens_per_second": (n_tokens - len(prompts)) / sum(decode_seconds),
            "steps": steps,
            "tokens_per_step": (sum(accepted) + len(accepted)) / len(accepted) if accepted else None,
            "step_ms": 1000 * sum(decode_seconds) / steps if steps else None,
            "per_position_acceptance": car,
            "first_difference": differences,
            "identical_to_greedy": all(d is None for d in differences),
            "matching_prompts": sum(d is None for d in differences),
        }
        if cuda and cuda_graphs:  # the decoder has just finished a generation: its state is frozen
            out[k].update(phase_times(dec))
        del dec
        if cuda:
            torch.cuda.empty_cache()
    greedy = out[0]
    for k in ks:
        r = out[k]
        r["speedup"] = greedy["seconds"] / r["seconds"]
        r["decode_speedup"] = greedy["decode_seconds"] / r["decode_seconds"]
        r["step_cost_vs_greedy"] = r["step_ms"] / greedy["step_ms"] if r["step_ms"] and greedy["step_ms"] else None
    return {"greedy": greedy, "speculative": [out[k] for k in ks]}, reference


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
            out[f"{name}_ms"] = start.elapsed_time(end) / iters
    return out
