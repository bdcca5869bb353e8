"""Helpers shared by the test-suite and the CPU demo (multi-process gloo runs)."""
