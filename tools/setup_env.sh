#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv and installs mtpd-megatron into it.
# CPU machines get the CPU torch wheel (2.13.0); a machine whose python already has a CUDA torch keeps it
# (the venv sees system site-packages only when MTPD_USE_SYSTEM_TORCH=1).
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
echo "[setup] creating $venv" >&2
if [ "${MTPD_USE_SYSTEM_TORCH:-0}" = 1 ]; then
  "$py" -m venv --system-site-packages "$venv"
else
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
# Install the engine first without its Requires-Python check, then the project with the normal
# resolver (a global --ignore-requires-python would pick py3.12-only releases of other packages).
"${pip[@]}" "numpy<2.4" packaging
"${pip[@]}" --no-deps --ignore-requires-python "megatron-core==0.19.2"
"${pip[@]}" -e ".[hf,dev]"
echo "$want" > "$stamp"
echo "[setup] ready: $venv" >&2
