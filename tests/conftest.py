"""Test-suite options shared by the test files."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--record-golden", action="store_true", default=False,
                     help="re-record tests/golden_losses.json from this run (test_parallel_equivalence.py)")
