"""Plumbing shared by the command-line tools: every failure a user can fix is one line and exit code 2.

Usage errors come from `cli_parser` (argparse, one line); errors raised while running (a bad config,
checkpoint, data file or path) are printed by `run_cli` as `prog: error: <one line>`; Ctrl-C exits with 130
and no traceback. Kept free of heavy imports so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (the contract of every CLI here) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli_parser(prog: str, description: Optional[str]) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage errors print one line and exit with code 2."""
    return _OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def check_device(parser: argparse.ArgumentParser, device: str, flag: str = "--device") -> None:
    """`--device cuda` on a machine without a visible GPU is a usage error, named by its flag."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"{flag} cuda: no GPU is visible here (use {flag} auto or cpu)")


def user_errors() -> tuple:
    """The exceptions that mean "fix your input": config, data and conversion errors (all ValueError),
    checkpoint errors and file-system errors."""
    from mtpd_megatron.checkpoint.layout import CheckpointError

    return (ValueError, CheckpointError, OSError)


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, *,
            errors: Optional[tuple] = None, cleanup: Optional[Callable[[], None]] = None, quiet: bool = True) -> int:
    """Run a tool's `main`; `errors` (default `user_errors()`) -> one `prog: error: ...` line, exit code 2.

    `cleanup` runs in every case (e.g. tearing down a process group). Outputs are written atomically by the
    tools themselves, so an error leaves nothing half-written. `quiet` silences megatron's import-time
    "TE/apex not installed" warnings, which would bury that line (it imports torch: off for torch-free tools).
    """
    if quiet:
        from mtpd_megatron.logging_utils import quiet_known_noise

        quiet_known_noise()
    errors = user_errors() if errors is None else errors
    try:
        return main(argv)
    except errors as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if cleanup is not None:
            cleanup()


def shutdown_distributed() -> None:
    """`cleanup` for tools that may have joined a process group (megatron's groups, then the group itself)."""
    from mtpd_megatron.parallel.launch import shutdown

    shutdown()
