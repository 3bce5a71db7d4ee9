#!/usr/bin/env bash
# Set everything up and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FEDPSG_DATA_DIR="${FEDPSG_DATA_DIR:-$(cd .. && pwd)/shared/data}"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
