#!/usr/bin/env bash
# PP=2 x TP=2 on this machine: 4 gloo processes (examples/pipeline_finetune.py), the embedded demo model.
set -euo pipefail
cd "$(dirname "$0")/../.."
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 4 \
  examples/pipeline_finetune.py --pp 2 --tp 2 --microbatches 4 --batch-size 8 "$@"
