#!/usr/bin/env bash
# Train on one machine with K local ranks (CPU: gloo; GPUs: NCCL, one rank per GPU).
#
#   launch/local.sh DATASET K [extra train flags...]
#   launch/local.sh coauthor-cs 4 --epochs 200 --use-pp
#
# Partitions once into runs/<dataset>-<K> (reused on later runs), then starts K workers
# with torchrun. Set BNS_PIPE_DATA to the dataset root (default ./data).
set -euo pipefail
dataset=${1:?usage: launch/local.sh DATASET K [train flags...]}
parts=${2:?usage: launch/local.sh DATASET K [train flags...]}
shift 2
out=runs/${dataset//[:\/]/_}-${parts}
bns-pipe partition --dataset "$dataset" --parts "$parts" --out "$out"
exec torchrun --standalone --nproc_per_node="$parts" -m bns_pipe train \
    --partition-dir "$out" --metrics-jsonl "$out/metrics.jsonl" "$@"
