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
# What the pipeline imports (the modules it imports lazily included): checks the install and compiles them.
IMPORTS="import torch, torch.profiler, torch.nn.attention, torchvision, torchvision.datasets, timm, timm.data, \
timm.loss, timm.optim, submitit, torchprofile, pandas, pandas.io.formats.csvs, matplotlib.pyplot, \
matplotlib.collections, matplotlib.backends.backend_agg, yaml, tabulate, tqdm, huggingface_hub"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # --no-compile: pip would byte-compile every module of every package (torch's, sympy's, pandas' tests...),
    # 45 s of a 111 s install on this project's machine; the import check below writes the bytecode of what
    # the pipeline imports (about 2,750 modules, 20-29 s), even where PYTHONDONTWRITEBYTECODE is set; other
    # modules (torch.compile's, 580 more) are compiled when first imported, as Python does.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]" 2>&1 \
        | grep -v "^WARNING: Location" || true
    PYTHONDONTWRITEBYTECODE= MPLBACKEND=Agg "$VENV/bin/python" -c "$IMPORTS"
    touch "$stamp"
fi

# Fashion-MNIST from Debian's package (no network needed beyond the package registry).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi
echo "environment ready: $VENV"
