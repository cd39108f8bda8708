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
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
    # The tests that patch the core's internals cannot reach into the compiled modules
    # (sovfs/_native.py): they run again here against the Python sources.
    echo "== pytest, pure-Python core (SOVFS_PURE=1, -m pure_python)"
    SOVFS_PURE=1 .venv/bin/python -m pytest -m pure_python
fi
