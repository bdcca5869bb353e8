#!/usr/bin/env python3
"""Tokenise jsonl/txt documents into megatron-core indexed datasets (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input data/corpus/corpus.jsonl --tokenizer data/tok/tokenizer.json \
        --output-prefix data/tokens/corpus --append-eod [--workers 8]

Inputs: .jsonl files hold one {"text": ...} object per line (one document each); a .txt file is one
document (--txt-mode file, the default) or one document per blank-line-separated block (--txt-mode
blank-line). Output is written under temporary names and renamed when complete.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mtpd_megatron.data.indexed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
