#!/usr/bin/env python3
"""Domain-shift experiment: fine-tune a pretrained export on a new domain with heads frozen / CE only / MTP-D.

    python tools/run_posttrain_experiment.py --export EXPORT --out DIR [--config configs/posttrain/stdlib_gpu_small.yaml]
        [--arms frozen,ce,mtpd] [--zero-stage 2|3] [section.key=value ...]

Writes DIR/<arm>/export (each a reloadable export with heads), DIR/results.json, DIR/results.md (the table for
docs/results.md) and DIR/acceptance.png. See mtpd_megatron/posttrain/experiment.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtpd_megatron.posttrain.experiment import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
