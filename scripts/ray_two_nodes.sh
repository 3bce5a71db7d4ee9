#!/usr/bin/env bash
# A Ray cluster of two nodes on this machine (a head and a worker started with `ray start`, each
# with its own CPUs) and a simulation on it: the parties' stages run on both nodes.
#   bash scripts/ray_two_nodes.sh [fedpsg.simulate flags...]    (default: tiny profile, 2 stages)
# Environment: CPUS_PER_NODE (default 1), RAY_PORT (default 6390).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
PORT="${RAY_PORT:-6390}"
CPUS="${CPUS_PER_NODE:-1}"
HEAD_DIR=$(mktemp -d /tmp/fedpsg-ray-head.XXXX)
export RAY_worker_niceness=0  # an increment: Ray's workers at this shell's priority, not 15 above it
cleanup() { $RAY stop --force >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
$RAY start --head --port "$PORT" --num-cpus "$CPUS" --resources '{"head": 1}' --include-dashboard false \
    --disable-usage-stats --temp-dir "$HEAD_DIR" >/dev/null
# A second raylet on the same host: its own node, its own CPUs.
$RAY start --address "127.0.0.1:$PORT" --num-cpus "$CPUS" --resources '{"worker": 1}' --disable-usage-stats >/dev/null
.venv/bin/python - <<PY
import ray
ray.init(address="127.0.0.1:$PORT", include_dashboard=False, logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
print(f"Ray cluster: {len(nodes)} nodes, {sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPUs")
PY
if [ "$#" -eq 0 ]; then
  set -- --scenario split_fmnist --profile tiny --stages 2 --methods dpmerf,dpdm --out runs/ray-two-nodes
fi
.venv/bin/python -m fedpsg.simulate --ray-address "127.0.0.1:$PORT" "$@"
