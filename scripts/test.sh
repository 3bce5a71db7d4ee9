#!/usr/bin/env bash
# Set everything up and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FEDPSG_DATA_DIR="${FEDPSG_DATA_DIR:-$(cd .. && pwd)/shared/data}"
.venv/bin/ruff check .
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# The unit tests two at a time, one thread each (xdist); the end-to-end runs after them, alone:
# they start their own Ray workers on every core and some wait on wall-clock deadlines.
.venv/bin/python -m pytest -q -n 2 -m "not slow"
.venv/bin/python -m pytest -q -m slow
