#!/usr/bin/env bash
# Make FashionMNIST available offline: if no data root has it, install Debian's
# dataset-fashion-mnist package (files under /usr/share/datasets/fashion-mnist/).
set -euo pipefail
root="${FEDPSG_DATA_DIR:-data}"
if [ -f "$root/FashionMNIST/raw/train-images-idx3-ubyte" ] || [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "FashionMNIST not found: installing Debian's dataset-fashion-mnist" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "FashionMNIST not found and apt-get unavailable: torchvision will try to download it" >&2
fi
