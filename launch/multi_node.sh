#!/usr/bin/env bash
# Several nodes over ssh/pdsh with DeepSpeed's hostfile ("<host> slots=<gpus>" per line):
#   HOSTFILE=hostfile launch/multi_node.sh stage=structbert model=large data.dir=/shared/prepared run.dir=/shared/runs/large
# run.dir and data.dir must be on a file system that every node sees (checkpoints are written by every rank).
# The first host of the hostfile is the master; MASTER_PORT may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
[ -f "$HOSTFILE" ] || { echo "multi_node.sh: error: hostfile $HOSTFILE not found" >&2; exit 2; }
MASTER=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER" --master_port "${MASTER_PORT:-29500}" \
    --module pretrain.train "$@"
