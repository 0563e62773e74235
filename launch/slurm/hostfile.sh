#!/usr/bin/env bash
# A DeepSpeed hostfile ("<host> slots=<ranks>" per line) for the nodes of the current Slurm allocation, for
# clusters where the `deepspeed` launcher reaches the nodes over ssh/pdsh (inside `salloc -N 2` or a batch job):
#   launch/slurm/hostfile.sh > hostfile
#   deepspeed --hostfile hostfile --master_addr "$(awk 'NR==1{print $1}' hostfile)" --module pretrain.train ...
# (or HOSTFILE=hostfile launch/multi_node.sh ...). Ranks per node: GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else 1.
# train.sbatch does not need this: under Slurm it starts one `deepspeed --no_ssh` per node with srun.
set -euo pipefail
nodes=${1:-${SLURM_JOB_NODELIST:?hostfile.sh: not inside a Slurm allocation (or pass a node list: hostfile.sh "n[1-4]")}}
slots=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
scontrol show hostnames "$nodes" | awk -v slots="$slots" '{print $1 " slots=" slots}'
