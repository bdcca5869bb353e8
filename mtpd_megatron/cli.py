"""Plumbing shared by every command-line entry point (tools/, `python -m mtpd_megatron.train|config|looped`,
the converters): every failure a user can fix is one line `prog: error: <message>` and exit code 2.

Usage errors come from `cli_parser` (argparse, one line naming the flag); errors raised while running (a bad
config, checkpoint, data file or path) are printed by `run_cli` (or `report_error` where the entry point
handles them itself) in the same form; Ctrl-C exits with 130 and no traceback. Kept free of heavy imports
so that `--help` and usage errors stay instant and print nothing before their line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence

TRAIN_PROG = "mtpd-train"  # python -m mtpd_megatron.train (and the trainer's own error lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (the contract of every CLI here) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(self.prog, f"{message} (see {self.prog} --help)") + "\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse, but a flag this parser does not know is named first: argparse would otherwise report
        the required arguments it misses and never mention the typo the user made."""
        if self._subparsers is None:  # a parser with subcommands leaves their flags to them
            for arg in sys.argv[1:] if args is None else args:
                if arg == "--":
                    break
                flag = arg.split("=", 1)[0]
                if (
                    flag.startswith("-")
                    and len(flag) > 1
                    and not flag[1].isdigit()
                    and not any(known.startswith(flag) for known in self._option_string_actions)
                ):
                    self.error(f"unrecognized arguments: {arg}")
        return super().parse_known_args(args, namespace)


def cli_parser(prog: str, description: Optional[str]) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage errors print one line and exit with code 2."""
    return OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def error_line(prog: str, message) -> str:
    """`prog: error: <message on one line>`."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def report_error(prog: str, error, code: int = 2) -> int:
    """Print `error_line` on stderr; return the exit code (2: the user can fix it)."""
    print(error_line(prog, error), file=sys.stderr, flush=True)
    return code


def source_commit() -> Optional[str]:
    """The checkout's short commit (recorded beside benchmark and experiment results), or None outside git.
    `MTPD_SOURCE_COMMIT` overrides it: a copy of the tree without its own history (a GPU machine's working
    copy, a container image) names the commit its files are."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("MTPD_SOURCE_COMMIT"):
        return os.environ["MTPD_SOURCE_COMMIT"]

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


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


def run_cli(
    prog: str,
    main: Callable[[Optional[Sequence[str]]], int],
    argv: Optional[Sequence[str]] = None,
    *,
    errors: Optional[tuple] = None,
    cleanup: Optional[Callable[[], None]] = None,
    quiet: bool = True,
) -> int:
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
        return report_error(prog, err)
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
