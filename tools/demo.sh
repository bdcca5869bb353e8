#!/usr/bin/env bash
# The README main job: set up .venv if needed, then run the end-to-end demo (tools/demo.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" tools/demo.py "$@"
