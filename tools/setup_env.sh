#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv and installs mtpd-megatron into it:
# torch 2.13.0, megatron-core 0.19.2, transformers, safetensors, tokenizers, tensorboard, matplotlib, pytest
# (~1.4 GB with the CPU torch). A machine without an NVIDIA GPU gets the CPU build of torch explicitly: from
# the PyTorch CPU wheel index when it is reachable, else the registry's wheel (on an ordinary machine that
# would be the multi-GB CUDA build, so it says so). With a GPU, the registry's (CUDA) torch; a python that
# already has a CUDA torch can keep it with MTPD_USE_SYSTEM_TORCH=1 (the venv then sees system site-packages).
# megatron-core 0.19.2 declares Python >= 3.12 but ships a working cp311 wheel, hence
# --ignore-requires-python (see docs/design.md, "Install").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${MTPD_VENV:-$root/.venv}
py=${PYTHON:-python3}
stamp="$venv/.mtpd-stamp"
want=$(cat pyproject.toml tools/setup_env.sh | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $venv (first use: ~2-3 minutes, ~1.4 GB; reused afterwards)" >&2
if [ "${MTPD_USE_SYSTEM_TORCH:-0}" = 1 ]; then
  "$py" -m venv --system-site-packages "$venv"
else
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
torch_pin="torch==2.13.0"
cpu_index=https://download.pytorch.org/whl/cpu
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing $torch_pin (CUDA build)" >&2
    "${pip[@]}" "$torch_pin"
  elif "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null; then
    echo "[setup] no GPU: installing $torch_pin from the PyTorch CPU index" >&2
    "${pip[@]}" "$torch_pin" --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
  else
    echo "[setup] no GPU and $cpu_index unreachable: installing $torch_pin from the configured registry" >&2
    "${pip[@]}" "$torch_pin"
    if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
      echo "[setup] note: the registry gave a CUDA build of torch (large, needs no GPU to run on CPU)" >&2
    fi
  fi
fi
# Install the engine first without its Requires-Python check, then the project with the normal
# resolver (a global --ignore-requires-python would pick py3.12-only releases of other packages).
echo "[setup] numpy, megatron-core 0.19.2 ..." >&2
"${pip[@]}" "numpy<2.4" packaging
"${pip[@]}" --no-deps --ignore-requires-python "megatron-core==0.19.2"
echo "[setup] mtpd-megatron with transformers, safetensors, tokenizers, tensorboard, matplotlib, pytest ..." >&2
"${pip[@]}" -e ".[hf,dev]"
echo "$want" > "$stamp"
echo "[setup] ready: $venv ($(du -sh "$venv" 2>/dev/null | cut -f1), ${SECONDS}s)" >&2
