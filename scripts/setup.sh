#!/usr/bin/env bash
# Create .venv with fedpsg and its dependencies (idempotent). torch 2.14.1 / torchvision 0.29.1
# are pinned; pip takes them from a local wheel cache where one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
