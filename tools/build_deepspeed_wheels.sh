#!/usr/bin/env bash
# Wheels of DeepSpeed and the pure-Python packages it needs that the GPU machine lacks, for carrying there (it has no
# internet; /work/shared/research/gpu-machine.md: Python 3.12, torch 2.11 + CUDA 13, transformers, safetensors,
# tokenizers, matplotlib present; deepspeed absent). DeepSpeed is an sdist-only package on PyPI, so pip builds its
# wheel here (pure Python; its CUDA ops are compiled on first use, and post-training uses none of them: torch's AdamW).
# The dependencies are downloaded as py3 / cp312 manylinux wheels. Writes into ${1:-.whl-ds}; keep that directory out
# of git with `echo /.whl-ds/ >> .git/info/exclude`. On the GPU machine:
#   pip install -q --no-index --find-links .whl-ds deepspeed
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.whl-ds}
py=${PYTHON:-$root/.venv/bin/python}
[[ -x $py ]] || py=python3
mkdir -p "$out"
ver=${DEEPSPEED_VERSION:-0.19.8}
# 1. deepspeed itself: a pure-Python wheel built from the sdist without compiling any op (DS_BUILD_OPS=0)
DS_BUILD_OPS=0 "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$out" "deepspeed==$ver"
# 2. its requirements that the GPU machine does not have, as wheels for CPython 3.12 on x86-64 Linux
# (numpy and torch are there; psutil, tqdm, packaging and typing-extensions >= 4.16 (pydantic) may be missing or old)
deps=(hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions msgpack einops
      psutil tqdm packaging)
"$py" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --no-deps -d "$out" "${deps[@]}"
ls -1 "$out"
du -sh "$out"
