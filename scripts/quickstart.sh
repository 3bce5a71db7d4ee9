#!/usr/bin/env bash
# Set everything up and run the main job: the federated three-method comparison (CPU profile off-GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure_data.sh
.venv/bin/python -m fedpsg.simulate --scenario split_fmnist --eps 10 "$@"
