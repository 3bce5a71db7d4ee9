# One image for every service of docker-compose.yml: the SuperLink (it runs the ServerApp in a
# subprocess), the SuperNodes (they run the ClientApp) and the one-shot submitter.
# Ubuntu-based: torch does not install on Flower's Alpine tags.
FROM ubuntu:24.04

ARG FLWR_VERSION=1.41.0
# Extra package index for pip (e.g. PyTorch's CPU-only wheel index, for a much smaller image).
ARG PIP_EXTRA_INDEX_URL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedpsg ./fedpsg
COPY clients ./clients
COPY server ./server
COPY scenarios ./scenarios
RUN pip install "flwr[simulation]==${FLWR_VERSION}" . \
 && python -c "import flwr, torch, opacus; print('flwr', flwr.__version__, 'torch', torch.__version__)"

# Non-root user for the services; /data (datasets) and /results (outputs) are mounted.
RUN useradd --create-home --uid 1000 fedpsg && mkdir -p /results /state && chown fedpsg /results /state
USER fedpsg
