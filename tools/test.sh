#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv if needed, then run the whole suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
