#!/usr/bin/env python
"""Convert a Hugging Face model directory into a torch_dist checkpoint (loads at any TP/EP/PP).

    python tools/convert_from_hf.py --hf runs/tiny_dense/hf --out runs/tiny_dense/from_hf \\
        [--config configs/tiny_dense.yaml] [--tp 2 --ep 2] [--mtp auto|copy|init|none]

See mtpd_megatron/convert/from_hf.py. Errors are one line on stderr with exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtpd_megatron.convert.from_hf import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
