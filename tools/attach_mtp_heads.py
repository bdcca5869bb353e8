#!/usr/bin/env python
"""Re-attach MTP heads to a Hugging Face model, e.g. after a fine-tune through transformers dropped them.

    python tools/attach_mtp_heads.py --model FINETUNED_HF --heads EXPORT_OR_CHECKPOINT [--out NEW_DIR] \\
        [--mtp auto|sidecar|inline] [--overwrite]

See mtpd_megatron/convert/mtp_heads.py and docs/serving.md. Errors are one line on stderr with exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtpd_megatron.convert.mtp_heads import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
