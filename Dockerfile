# One image for every service of docker-compose.yml: the SuperLink (it runs the ServerApp in a
# subprocess), the SuperNodes (they run the ClientApp) and the one-shot submitter.
# Ubuntu-based by default (torch does not install on Flower's Alpine tags); any Debian/Ubuntu
# base with Python >= 3.11 works: --build-arg BASE_IMAGE=... (scripts/docker_setup.sh builds
# local/debian:bookworm where no registry answers). The datasets are never in the image: mount them.
#
# Build args:
#   BASE_IMAGE           default ubuntu:24.04
#   FLWR_VERSION         the Flower pin (the same as pyproject.toml)
#   PIP_INDEX_URL        primary package index (default PyPI)
#   PIP_EXTRA_INDEX_URL  an extra index, e.g. PyTorch's CPU-only wheels
#                        (https://download.pytorch.org/whl/cpu): pip then prefers torch==2.14.1+cpu,
#                        ~1 GB of venv instead of PyPI's ~6 GB CUDA build
ARG BASE_IMAGE=ubuntu:24.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl util-linux \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The dependency list alone, so that the big install layer below is cached until it changes
# (not on every edit of pyproject.toml or of the code).
FROM base AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; \
deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"

FROM base
ARG FLWR_VERSION=1.41.0
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=""
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN PIP_INDEX_URL="${PIP_INDEX_URL}" PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" \
    pip install -r /tmp/requirements.txt "flwr[simulation]==${FLWR_VERSION}" \
 && python -c "import flwr, torch, opacus; print('flwr', flwr.__version__, 'torch', torch.__version__)"

# Services run as uid 1000 (FEDPSG_UID/FEDPSG_GID at run time): reuse the base's uid-1000 user
# (ubuntu:24.04 has `ubuntu`) or create `fedpsg`. The entrypoint starts as root, makes /results
# and /state writable, copies the mounted certificates for that user, then drops to it.
RUN set -eu; \
    getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home --home-dir /home/fedpsg fedpsg; \
    mkdir -p /home/fedpsg /results /state /certificates; \
    chown 1000:1000 /home/fedpsg /results /state; \
    chmod 1777 /home/fedpsg /state  # any FEDPSG_UID can keep its party folder (ledger) in /state
ENV HOME=/home/fedpsg USER=fedpsg LOGNAME=fedpsg
COPY scripts/container_entrypoint.sh /usr/local/bin/fedpsg-entrypoint

# The app (the bundle `flwr run /app` submits): sources only, no build/ or *.egg-info left behind.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedpsg ./fedpsg
COPY clients ./clients
COPY server ./server
COPY scenarios ./scenarios
COPY policies ./policies
RUN PIP_INDEX_URL="${PIP_INDEX_URL}" pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && find /app -name __pycache__ -prune -exec rm -rf {} +

ENTRYPOINT ["/usr/local/bin/fedpsg-entrypoint"]
CMD ["flower-superlink", "--help"]
