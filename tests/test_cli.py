"""Every command-line entry point answers a flag it does not know with ONE line `prog: error: ...` naming
that flag, exit code 2, and nothing else on stderr (no import-time warnings before the line).

One shared helper (mtpd_megatron/cli.py) gives every tool and `python -m mtpd_megatron.{train,config,looped}`
this behaviour; this test runs each of them as a user would, so a tool that builds its own parser, or imports
something noisy before parsing, fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))
MODULES = ["mtpd_megatron.train", "mtpd_megatron.config", "mtpd_megatron.looped"]
BAD = "--no-such-flag"


def _command(entry: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / entry)] if entry.endswith(".py") else [sys.executable, "-m", entry]


@pytest.mark.parametrize("entry", TOOLS + MODULES)
def test_unknown_flag_is_one_line_exit_2(entry: str):
    args = ["status", BAD] if entry == "mtpd_megatron.looped" else [BAD]  # looped: a flag of a subcommand
    proc = subprocess.run(_command(entry) + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert re.match(r"^[^\s:][^:]*: error: ", lines[0]) and BAD in lines[0], lines[0]
    assert proc.stdout == ""


def test_source_commit_is_the_checkouts_unless_named(monkeypatch):
    """Results record the checkout's commit; a copy without its own history names it via MTPD_SOURCE_COMMIT."""
    from mtpd_megatron.cli import source_commit

    monkeypatch.delenv("MTPD_SOURCE_COMMIT", raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    ).stdout.strip()
    assert source_commit() == (head or None)
    monkeypatch.setenv("MTPD_SOURCE_COMMIT", "abc1234")
    assert source_commit() == "abc1234"
