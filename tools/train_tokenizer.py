#!/usr/bin/env python3
"""Train a ByteLevel BPE tokenizer (HF tokenizers) on a jsonl/txt corpus.

    python tools/train_tokenizer.py --input data/corpus/corpus.jsonl --vocab-size 4096 --out data/tok

Writes DIR/tokenizer.json plus tokenizer_config.json and special_tokens_map.json (loadable by
transformers.PreTrainedTokenizerFast); <|endoftext|> (id 0) is BOS/EOS/EOD, <|pad|> (id 1) pads.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mtpd_megatron.data.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
