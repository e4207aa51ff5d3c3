#!/usr/bin/env bash
# Set up everything tokenbench needs on a fresh machine: a virtual environment in .venv with the project
# and its dependencies, and (as root on Debian) the Fashion-MNIST package the embedded default reads.
# Idempotent: a second call only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TOKENBENCH_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp="$VENV/.tokenbench-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 \
        | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, torchvision, timm, submitit, torchprofile, pandas"
    touch "$stamp"
fi

# Fashion-MNIST from Debian's package (no network needed beyond the package registry).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi
echo "environment ready: $VENV"
