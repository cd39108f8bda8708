#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the checks and the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ledger`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
