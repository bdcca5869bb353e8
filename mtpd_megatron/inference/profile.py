"""Where the time of one decoding step goes: torch.profiler kernel tables and a grouped summary.

`profile_step(decoder, prompt, ...)` decodes `prompt` once (the warm-up also captures the CUDA graphs), then,
with the state frozen (every sample at its limit, so a step changes nothing; see
SpeculativeDecoder.step_phases), runs `iters` steps eagerly under torch.profiler with the decoder's
record_function regions on (verify, draft.depth<k>, <phase>.output_layer / .argmax, head_prologue, attention).
It writes the `key_averages()` table sorted by device time (CPU time on a CPU run) and returns a summary:

* kernels per step and GPU-busy ms per step (sum of kernel times), the replayed CUDA-graph step ms, and their
  difference = the time the GPU waits between kernels inside the graph (launch latency, "launches");
* device time per kernel category (GEMM, attention, norms, argmax/reductions, copies/indexing, elementwise,
  other), by kernel name;
* device time per region (the heads' output layer, argmax, each depth, verify);
* host syncs per step (device-to-host copies and stream/device synchronisations seen by the profiler).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CATEGORIES = [  # first match wins; names are lower-cased kernel (CUDA) or operator (CPU) names
    ("attention", r"attention|fmha|flash|sdpa|softmax"),
    (  # nvjet_*: cuBLASLt's Hopper GEMM kernels (most GEMMs on an H200 with torch 2.11 + CUDA 13)
        "gemm",
        r"gemm|gemv|cutlass|xmma|cublas|nvjet|aten::mm|aten::addmm|aten::bmm|aten::linear|aten::matmul|splitk",
    ),
    ("norm", r"norm"),
    ("argmax/reduce", r"argmax|max|reduce|logsumexp"),
    ("copy/index", r"scatter|gather|index|copy|cat|memcpy|memset|fill"),
    (
        "elementwise",
        r"elementwise|vectorized|unrolled|triton|aten::(mul|add|sub|div|silu|neg|exp|rsqrt|pow|where|cos|sin)",
    ),
]
SYNC_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpy",
    "aten::_local_scalar_dense",
    "cudaEventSynchronize",
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def _device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value:
            return float(value)
    return 0.0


def _total_device_time(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        value = getattr(evt, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_step(decoder, prompt: list, new_tokens: int, out_dir, label: str, *, iters: int = 10) -> dict:
    """Profile one decoding step of `decoder` (see the module docstring); write `<label>_kernels.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mtpd_megatron.inference.benchmark import replay_ms
    from mtpd_megatron.inference.decoder import _compile_ready
    from mtpd_megatron.inference.kv_cache import cached_attention

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = decoder.device.type == "cuda"
    decoder.generate([prompt], new_tokens)  # warm-up; leaves the state frozen
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    summary = {
        "label": label,
        "k": decoder.k,
        "options": decoder.options.as_dict(),
        "iters": iters,
        "device": torch.cuda.get_device_name(decoder.device) if cuda else "cpu",
    }
    with (
        torch.no_grad(),
        cached_attention(decoder.model, decoder.state),
        _compile_ready(decoder.options.compile),
    ):
        decoder._step(), decoder._step()  # eager warm-up (the graphs were replays); pieces compiled with `compile`
        sync()
        decoder.annotate = decoder.state.annotate = not decoder.options.compile  # regions would recompile
        try:
            with profile(activities=activities):  # discarded: the profiler's own first-use costs
                for _ in range(3):
                    decoder._step()
                sync()
            with profile(activities=activities) as prof:
                for _ in range(iters):
                    decoder._step()
                sync()
        finally:
            decoder.annotate = decoder.state.annotate = False
        if cuda:
            summary["graph_step_ms"] = replay_ms(decoder._step)
    events = prof.key_averages()
    # Inductor names a kernel after every op it fused; the default 55 columns cut exactly the part that tells
    # two fused norms apart.
    table_args = {"row_limit": 80, "max_name_column_width": 160}
    try:
        table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", **table_args)
    except (AttributeError, KeyError):  # older torch names it after CUDA
        table = events.table(sort_by="self_cuda_time_total", **table_args)
    (out_dir / f"{label}_kernels.txt").write_text(table + "\n")
    summary.update(summarise(prof, iters, cuda))
    if cuda and summary.get("gpu_busy_ms_per_step") is not None:
        summary["launch_gap_ms_per_step"] = summary["graph_step_ms"] - summary["gpu_busy_ms_per_step"]
    (out_dir / f"{label}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _is_region(name: str) -> bool:
    """A decoder region named by `record_function` (verify, draft depths, prologue, attention, output layer,
    argmax). On CUDA the profiler also reports each range as a device-side event spanning its kernels: counted
    as a kernel it would add the region's whole duration again (measured: 25 ms "busy" in a 1.2 ms step)."""
    return (
        name.startswith(("verify", "draft", "head_prologue", "attention"))
        or ".output_layer" in name
        or (".argmax" in name)
    )


def summarise(prof, iters: int, cuda: bool) -> dict:
    """Group the profiler's events into kernel categories, decoder regions and host syncs, per step (ms)."""
    from torch.autograd import DeviceType

    cats, kernels, busy = {}, 0, 0.0
    regions, syncs = {}, 0
    for evt in prof.events():
        is_kernel = getattr(evt, "device_type", None) == DeviceType.CUDA
        if is_kernel and _is_region(evt.name):
            continue  # the GPU-side range of a record_function region, not a kernel: it spans its kernels
        if cuda and is_kernel:
            t = float(evt.time_range.elapsed_us())  # a kernel's own duration
            kernels += 1
            busy += t
            cats[category(evt.name)] = cats.get(category(evt.name), 0.0) + t
        elif (
            not cuda
            and not is_kernel
            and evt.name.startswith("aten::")
            and evt.cpu_parent is not None
            and not evt.cpu_parent.name.startswith("aten::")
        ):
            t = float(evt.cpu_time_total)  # top-level aten ops (children are inside their parent's time)
            kernels += 1
            busy += t
            cats[category(evt.name)] = cats.get(category(evt.name), 0.0) + t
        if not is_kernel and any(evt.name.startswith(s) for s in SYNC_NAMES):
            syncs += 1
    for evt in prof.key_averages():
        if _is_region(evt.key):
            t = _total_device_time(evt) if cuda else float(evt.cpu_time_total)
            regions[evt.key] = t / iters / 1000.0
    per = lambda us: us / iters / 1000.0  # noqa: E731 -- microseconds over all iterations -> ms per step
    return {
        "time_source": "CUDA kernel time" if cuda else "CPU time of top-level aten ops",
        "kernels_per_step": kernels / iters,
        "gpu_busy_ms_per_step" if cuda else "op_ms_per_step": per(busy),
        "by_category_ms": {c: per(t) for c, t in sorted(cats.items(), key=lambda x: -x[1])},
        "by_region_ms": dict(sorted(regions.items())),
        "host_syncs_per_step": syncs / iters,
    }


def summary_markdown(summaries: list) -> str:
    """One table: a column per profiled step, a row per figure."""
    if not summaries:
        return ""
    cats = sorted({c for s in summaries for c in s["by_category_ms"]})
    regions = sorted({r for s in summaries for r in s["by_region_ms"]})
    head = "| | " + " | ".join(s["label"] for s in summaries) + " |"
    lines = [head, "|---" * (len(summaries) + 1) + "|"]

    def row(name, values):
        lines.append(
            f"| {name} | "
            + " | ".join("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in values)
            + " |"
        )

    for key in (
        "graph_step_ms",
        "gpu_busy_ms_per_step",
        "op_ms_per_step",
        "launch_gap_ms_per_step",
        "kernels_per_step",
        "host_syncs_per_step",
    ):
        if any(key in s for s in summaries):
            row(key, [s.get(key) for s in summaries])
    for c in cats:
        row(f"category: {c} (ms)", [s["by_category_ms"].get(c) for s in summaries])
    for r in regions:
        row(f"region: {r} (ms, inclusive)", [s["by_region_ms"].get(r) for s in summaries])
    return "\n".join(lines) + "\n"
