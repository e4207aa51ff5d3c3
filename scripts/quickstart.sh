#!/usr/bin/env bash
# The embedded default, end to end: set up, run every method on the committed Fashion-MNIST ViT
# (configs/quickstart.yaml) and write results/quickstart/leaderboard.md, .csv and pareto.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python run_bench.py --config configs/quickstart.yaml "$@"
