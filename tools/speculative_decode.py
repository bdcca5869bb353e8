#!/usr/bin/env python3
"""Decode a prompt with the MTP heads as drafters and check the output equals greedy decoding.

    python tools/speculative_decode.py --ckpt runs/demo/checkpoints --prompt "The Congress" --k 4

Loads the checkpoint (any saved TP/EP, resharded to one process), decodes greedily and self-speculatively
(K drafts from the cascaded heads, K+1 positions verified by the main model per step), prints the text,
tokens per step, per-position acceptance and whether the two outputs are token-identical.
Exit codes: 0 ok, 1 speculative output differs from greedy, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


PROG = "speculative_decode"


def _main(argv=None) -> int:
    from mtpd_megatron.cli import cli_parser

    p = cli_parser(PROG, __doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint iter_N directory or save directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--k", type=int, default=4, help="drafted tokens per step (<= MTP heads)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--draft-threshold",
        type=float,
        default=None,
        metavar="P",
        help="adaptive drafting: stop at the first head whose top-1 probability is below P",
    )
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    if a.k < 1:
        p.error(f"--k {a.k}: draft at least one token per step (1 <= K <= the model's MTP heads)")
    if a.new_tokens < 1:
        p.error(f"--new-tokens {a.new_tokens}: must be >= 1")
    if a.draft_threshold is not None and not 0.0 < a.draft_threshold < 1.0:
        p.error(f"--draft-threshold {a.draft_threshold}: must be a probability in (0, 1)")
    if not a.prompt.strip():
        p.error("--prompt is empty: give some text to continue")
    from mtpd_megatron.cli import check_device

    check_device(p, a.device)

    from mtpd_megatron.inference.decoder import speculative_demo
    from mtpd_megatron.inference.loading import load_for_inference, load_tokenizer_for

    loaded = load_for_inference(a.ckpt, device=a.device)
    tokenizer = load_tokenizer_for(loaded)
    from mtpd_megatron.inference.options import DecodeOptions

    result = speculative_demo(
        loaded.model,
        tokenizer,
        a.prompt,
        a.k,
        a.new_tokens,
        vocab_limit=loaded.vocab_size,
        options=DecodeOptions(draft_threshold=a.draft_threshold),
    )
    accept = " ".join(f"{x:.2f}" for x in result["per_position_acceptance"])
    print(f"prompt: {a.prompt!r}")
    print(f"continuation: {result['text']!r}")
    print(
        f"K={a.k}: {result['new_tokens']} tokens in {result['steps']} steps = {result['tokens_per_step']:.2f} "
        f"tokens/step; per-position acceptance {accept}; identical to greedy: {result['identical_to_greedy']}; "
        f"wall-clock {result['greedy_seconds']:.2f}s greedy vs {result['speculative_seconds']:.2f}s speculative"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return 0 if result["identical_to_greedy"] else 1


def main(argv=None) -> int:
    from mtpd_megatron.cli import run_cli, shutdown_distributed

    return run_cli(PROG, _main, argv, cleanup=shutdown_distributed)


if __name__ == "__main__":
    sys.exit(main())
