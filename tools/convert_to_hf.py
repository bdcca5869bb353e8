#!/usr/bin/env python
"""Convert a torch_dist checkpoint (any TP/EP/PP) into a Hugging Face model directory.

    python tools/convert_to_hf.py --ckpt runs/tiny_dense/checkpoints --out runs/tiny_dense/hf [--dtype bf16]

See mtpd_megatron/convert/to_hf.py. Errors are one line on stderr with exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtpd_megatron.convert.to_hf import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
