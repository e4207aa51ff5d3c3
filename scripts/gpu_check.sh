#!/usr/bin/env bash
# GPU smoke check, minutes on one GPU node: every registered method on DeiT-S (random weights): max |logit|
# difference CUDA vs CPU, fp32 and bf16 throughput and speed-ups, SDPA kernels, and 2 steps of DDP
# fine-tuning (NCCL, 2 processes when 2 GPUs exist). Arguments go to scripts/gpu_check.py, e.g.
#   bash scripts/gpu_check.sh                            # on a GPU node (srun --gres=gpu:2 ... works too)
#   bash scripts/gpu_check.sh --device cpu --small       # a dry run on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
exec "$PYTHON" scripts/gpu_check.py "$@"
