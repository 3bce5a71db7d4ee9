#!/usr/bin/env bash
# The multi-party demo in containers, to completion: SuperLink + 5 SuperNodes + submit
# (docker-compose.yml), optionally with TLS + SuperNode authentication (docker-compose.tls.yml)
# or GPUs (docker-compose.gpu.yml). Exits 0 only if the run finished:completed and wrote DONE,
# prints where the results are, and tears the stack down by its project name.
#
#   bash scripts/compose_demo.sh                                  # split_fmnist, CPU profile, all methods
#   bash scripts/compose_demo.sh --tls --profile tiny --stages 2 --methods psg
#
# Options (each also an environment variable, see docker-compose.yml):
#   --tls               TLS + SuperNode authentication; makes the CA, the SuperLink certificate and
#                       the 5 node keys in $CERTS_DIR (default ./certificates) if missing
#   --gpu               add docker-compose.gpu.yml (NVIDIA Container Toolkit)
#   --scenario S        SCENARIO (split_fmnist)      --eps E       EPS (10)
#   --methods M         METHODS ("" = the scenario's) --profile P  PROFILE (cpu)
#   --stages N          STAGES ("" = all)            --set "..."   SET (section.key=value ...)
#   --repeats N         REPEATS (1): independent repetitions, each charged to the parties' ledgers
#   --results DIR       RESULTS_DIR (./results); the run goes to DIR/RUN_NAME
#   --run-name NAME     RUN_NAME (default: the scenario). A folder that holds a finished or
#                       interrupted run with the same settings is resumed; other settings are refused
#   --data DIR          every party's and the coordinator's data folder (default $FEDPSG_DATA_DIR or ./data)
#   --project NAME      compose project name (COMPOSE_PROJECT_NAME, default fedpsg-demo)
#   --all-logs          show every service's log (default: only submit's, which streams the run's log)
#   --keep              leave the stack running (stop it: docker compose -p NAME down -v)
#   --no-setup          skip scripts/docker_setup.sh (engine, Compose v2, base image)
set -euo pipefail
caller="$PWD"
repo="$(cd "$(dirname "$0")/.." && pwd)"
# Paths given by the caller (options or variables) are relative to the caller's directory;
# the defaults (./data, ./results, ./certificates) to the repository.
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }

tls=0 gpu=0 keep=0 setup=1 attach=(--attach submit)
project="${COMPOSE_PROJECT_NAME:-fedpsg-demo}"
data="$repo/data"
[ -n "${FEDPSG_DATA_DIR:-}" ] && data="$(from_caller "$FEDPSG_DATA_DIR")"
[ -n "${RESULTS_DIR:-}" ] && RESULTS_DIR="$(from_caller "$RESULTS_DIR")"
[ -n "${CERTS_DIR:-}" ] && CERTS_DIR="$(from_caller "$CERTS_DIR")"
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) tls=1 ;;
    --gpu) gpu=1 ;;
    --keep) keep=1 ;;
    --all-logs) attach=() ;;
    --no-setup) setup=0 ;;
    --scenario) export SCENARIO="$2"; shift ;;
    --eps) export EPS="$2"; shift ;;
    --methods) export METHODS="$2"; shift ;;
    --profile) export PROFILE="$2"; shift ;;
    --stages) export STAGES="$2"; shift ;;
    --set) export SET="$2"; shift ;;
    --repeats) export REPEATS="$2"; shift ;;
    --results) RESULTS_DIR="$(from_caller "$2")"; shift ;;
    --run-name) export RUN_NAME="$2"; shift ;;
    --data) data="$(from_caller "$2")"; shift ;;
    --project) project="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "compose_demo: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$repo"

if [ "$setup" = 1 ]; then
  base="$(bash scripts/docker_setup.sh | tail -n1)"
  export "${base?}"  # BASE_IMAGE=...
fi

# Data: one folder for everybody unless PARTYk_DATA / SUPERLINK_DATA say otherwise.
[ -d "$data" ] || { echo "compose_demo: no data folder $data (--data, FEDPSG_DATA_DIR)" >&2; exit 2; }
export SUPERLINK_DATA="${SUPERLINK_DATA:-$data}"
for k in 0 1 2 3 4; do
  var="PARTY${k}_DATA"
  export "$var=${!var:-$data}"
done

# Results: made here, by the caller, so that they are the caller's; the services run as the
# caller's uid (as uid 1000 when the caller is root).
export RESULTS_DIR="${RESULTS_DIR:-$repo/results}"
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
if [ "$(id -u)" -ne 0 ]; then
  export FEDPSG_UID="${FEDPSG_UID:-$(id -u)}" FEDPSG_GID="${FEDPSG_GID:-$(id -g)}"
fi
run_name="${RUN_NAME:-${SCENARIO:-split_fmnist}}"

files=(-f docker-compose.yml)
if [ "$tls" = 1 ]; then
  files+=(-f docker-compose.tls.yml)
  # Show which node keys were registered next to the run's log.
  [ "${#attach[@]}" -gt 0 ] && attach+=(--attach register)
  export CERTS_DIR="${CERTS_DIR:-$repo/certificates}"
  bash scripts/make_certs.sh "$CERTS_DIR" >/dev/null
  for k in 0 1 2 3 4; do
    [ -f "$CERTS_DIR/node-$k" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -f "$CERTS_DIR/node-$k"
  done
fi
[ "$gpu" = 1 ] && files+=(-f docker-compose.gpu.yml)
compose=(docker compose -p "$project" "${files[@]}")

teardown() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
if [ "$keep" = 0 ]; then
  trap teardown EXIT
fi
# Interrupted (Ctrl-C, SIGTERM from a timeout): stop the stack at once, not after `up` returns.
trap 'echo "compose_demo: interrupted; stopping $project" >&2; "${compose[@]}" stop -t 5 >/dev/null 2>&1; exit 130' INT TERM

echo "compose_demo: project $project; scenario ${SCENARIO:-split_fmnist}, profile ${PROFILE:-cpu}," \
  "stages ${STAGES:-all}, methods ${METHODS:-scenario default}, tls=$tls" >&2
started=$(date +%s)
set +e
# In the background so that the traps above run as soon as a signal arrives (`wait` returns).
"${compose[@]}" up --build --abort-on-container-exit --exit-code-from submit "${attach[@]}" </dev/null &
wait $!
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "compose_demo: the last lines of every service's log:" >&2
  "${compose[@]}" logs --no-color --tail 40 >&2 || true
fi
elapsed=$(( $(date +%s) - started ))
out="$RESULTS_DIR/$run_name"
if [ "$status" -eq 0 ] && [ -f "$out/DONE" ]; then
  echo "compose_demo: the run completed in ${elapsed} s; results in $out"
  [ -f "$out/report.md" ] && cat "$out/report.md"
  exit 0
fi
echo "compose_demo: FAILED (exit status $status after ${elapsed} s); see the log above and $out/run.log" >&2
exit $(( status == 0 ? 1 : status ))
