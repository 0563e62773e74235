#!/usr/bin/env bash
# One node, N ranks (GPUs, or CPU processes where there is no GPU):
#   GPUS=8 launch/single_node.sh stage=structbert model=base data.dir=data/prepared run.dir=runs/base
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus "${GPUS:-2}" --module pretrain.train "$@"
