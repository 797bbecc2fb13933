#!/usr/bin/env bash
# 2 nodes x 8 GPUs: TP=8 inside each node (NVLink), PP=2 across the nodes (one stage per node: only the stage
# boundary's activations cross the network, one micro-batch at a time), 8 micro-batches, 1F1B.
# Run on both nodes with NODE_RANK=0 / 1 and MASTER_ADDR=<node 0's address>:
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash configs/pipeline/gpu_2nodes_tp8_pp2.sh --model /path/to/model
# The ("pp", "dp", "tp") mesh puts ranks 0-7 (node 0) on stage 0 and ranks 8-15 (node 1) on stage 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes 2 --nproc_per_node 8 --node_rank "${NODE_RANK:?}" --master_addr "${MASTER_ADDR:?}" \
  --master_port "${MASTER_PORT:-29500}" \
  examples/pipeline_finetune.py --pp 2 --tp 8 --microbatches 8 --schedule 1F1B "$@"
