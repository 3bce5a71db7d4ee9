#!/usr/bin/env bash
# Set everything up and run the main job with the CPU profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure_data.sh
.venv/bin/python -m fedpsg.generate --dataset fmnist --classes 5,6 --eps 10 --spc 10 "$@"
