#!/usr/bin/env bash
# Two machines, G ranks each (K = 2G parts), rendezvous on node 0.
#
# Partition once on a filesystem both nodes see (or copy the directory to both):
#   bns-pipe partition --dataset ogbn-products --parts 8 --out /shared/products-8
# Then on node 0 and node 1 (NODE_RANK=0 / 1), with MASTER_ADDR = node 0's address:
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/two_node.sh /shared/products-8 4 --epochs 500
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/two_node.sh /shared/products-8 4 --epochs 500
# Each rank loads only its own part file. Checkpoints need a shared --checkpoint-dir.
set -euo pipefail
partition_dir=${1:?usage: launch/two_node.sh PARTITION_DIR RANKS_PER_NODE [train flags...]}
per_node=${2:?usage: launch/two_node.sh PARTITION_DIR RANKS_PER_NODE [train flags...]}
shift 2
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${NODE_RANK:?set NODE_RANK to 0 or 1}"
exec torchrun --nnodes=2 --nproc_per_node="$per_node" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id="${RDZV_ID:-bns_pipe}" \
    -m bns_pipe train --partition-dir "$partition_dir" "$@"
