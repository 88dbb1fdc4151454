#!/usr/bin/env bash
# Install asyncps and what it needs. On a machine without an NVIDIA GPU, torch comes as
# the CPU build (small and fast to install); with one, pip's default CUDA build.
# Debian packages for the metrics tests (prometheus) are installed when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q "torch>=2.1"
  else
    $PY -m pip install -q torch==2.13.0   # CPU build on CPU-only machines
  fi
fi
$PY -m pip install -q -e ".[test]"   # the test extra brings plots (matplotlib), ruff and mypy
# The metrics tests run a real Prometheus (and promtool) and check deploy/ with docker-compose;
# the Kubernetes tests render deploy/k8s with kubectl's kustomize (kubernetes-client; a kubectl
# already on PATH, e.g. Google Cloud SDK's, is kept: the package would conflict with it).
# Debian 12's kubernetes-client is 1.20, whose kustomize (v2.0.3) predates inline `patches`:
# tests/integration/test_k8s.py needs kubectl >= 1.21 (tested with 1.32, kustomize v5.5).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v prometheus && command -v promtool && command -v docker-compose && command -v kubectl; } >/dev/null 2>&1; then
  apt-get update -q
  pkgs="prometheus docker-compose"
  command -v kubectl >/dev/null 2>&1 || pkgs="$pkgs kubernetes-client"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
fi
# pyenv only puts new console scripts (ps-server, ps-worker, ps-cluster, ps-sample) on PATH after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
