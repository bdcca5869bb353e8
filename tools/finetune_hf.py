#!/usr/bin/env python3
"""Fine-tune an HF export with its MTP heads under DeepSpeed ZeRO-2/3 and write an export with the heads.

    python tools/finetune_hf.py --model EXPORT --out OUT [--heads mtpd|ce|frozen] [--zero-stage 2|3] [k=v ...]
    torchrun --nproc-per-node 8 tools/finetune_hf.py --config configs/posttrain/stdlib_gpu_small.yaml --model ...

See mtpd_megatron/posttrain/ and docs/serving.md ("Post-training with the heads").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtpd_megatron.posttrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
