#!/usr/bin/env bash
# The test suite, as CI runs it: set up, start the real single-node SLURM cluster (Debian packages; needs
# root), lint, run every test. SLURM integration tests fail (not skip) when the cluster is not up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

started_cluster=0
if ! bash slurm/local_cluster.sh status >/dev/null 2>&1; then
    bash slurm/local_cluster.sh start
    started_cluster=1
fi
cleanup() { [ "$started_cluster" = 1 ] && bash slurm/local_cluster.sh stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

.venv/bin/ruff check .
TOKENBENCH_REQUIRE_SLURM=1 .venv/bin/python -m pytest -q "$@"
