#!/usr/bin/env bash
# Two machines, G ranks each (K = 2G parts), meeting at a c10d rendezvous on node 0.
#
# Partition once on a filesystem both nodes see (or copy the directory to both):
#   bns-pipe partition --dataset ogbn-products --parts 8 --out /shared/products-8
# Then on node 0 and node 1, with MASTER_ADDR = the address of node 0:
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/two_node.sh /shared/products-8 4 --epochs 500
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/two_node.sh /shared/products-8 4 --epochs 500
#
# Node 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT (default 29500; RDZV_ID names the
# job, default bns_pipe). Global ranks are handed out in the order the nodes join, so global
# rank 0, which writes --metrics-jsonl and prints the summary, may run on either node: give a
# path that exists on both (a shared filesystem). Each rank loads only its own part file;
# checkpoints (--checkpoint-dir, needed by --max-restarts) must be on a shared filesystem.
# A node whose peer never arrives gives up after the train flag --timeout (default 300 s).
set -euo pipefail
usage="usage: NODE_RANK=0|1 MASTER_ADDR=HOST [MASTER_PORT=29500] launch/two_node.sh PARTITION_DIR RANKS_PER_NODE [train flags...]"
if [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
partition_dir=$1
per_node=$2
shift 2
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK to 0 or 1}"
case "$NODE_RANK" in
    0 | 1) ;;
    *) echo "NODE_RANK must be 0 or 1, not $NODE_RANK" >&2; exit 2 ;;
esac
exec "${PYTHON:-python3}" -m bns_pipe train --partition-dir "$partition_dir" \
    --nprocs "$per_node" --nnodes 2 --node-rank "$NODE_RANK" \
    --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-bns_pipe}" "$@"
