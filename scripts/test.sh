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
# The unit tests one at a time on one thread: their models are tiny, and on a 2-core machine two
# at a time (xdist) were no faster: each test took about twice as long (BENCHMARKS.md).
# The end-to-end runs after them: they start their own Ray workers on every core.
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not slow"
.venv/bin/python -m pytest -q -m slow
