"""Test-suite set-up shared by the test files: the CPU layer, and the `--record-golden` option.

The pytest process is one of the entry points that enter the CPU compatibility layer (cpu_compat.py), once,
when no GPU is visible; spawned ranks enter it in the harness (tests/distributed_harness.py) and trainer processes
in `launch.init_distributed`.
"""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption(
        "--record-golden",
        action="store_true",
        default=False,
        help="re-record tests/golden_losses.json from this run (test_parallel_equivalence.py)",
    )


def pytest_configure(config):
    import warnings

    import torch

    if not torch.cuda.is_available():
        from mtpd_megatron.parallel import cpu_compat

        with warnings.catch_warnings():  # megatron's import-time "Apex/TE not installed" notes
            warnings.simplefilter("ignore", UserWarning)
            cpu_compat.enable()
