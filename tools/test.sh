#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv if needed, lint (ruff), then run the whole suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
# Lint and format check first (seconds; configured in pyproject.toml): a failure names the file and line.
"$root/.venv/bin/ruff" check --quiet . || { echo "test.sh: error: ruff check failed (ruff check --fix . fixes most)" >&2; exit 1; }
"$root/.venv/bin/ruff" format --check --quiet . || { echo "test.sh: error: files need formatting (run: .venv/bin/ruff format .)" >&2; exit 1; }
exec "$root/.venv/bin/python" -m pytest -q "$@"
