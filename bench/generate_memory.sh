#!/usr/bin/env bash
# Peak memory per rank of pretrain.generate on a stage-two run of BERT-base shapes (model=base: 12 + 6 layers,
# hidden 768), and of the same model consolidated into one process (what pretrain.generate did before it ran
# partitioned: pretrain.generate.load_model). The run is trained for one step on the demo corpus (after `make demo`),
# only so that it has a ZeRO-3 checkpoint written by 2 ranks; its weights are as good as random.
#
#     bash bench/generate_memory.sh [prepared dir] [out dir]
#
# Prints each configuration's line: peak memory per rank (GiB; peak RSS on CPU, so the Python process is in it).
set -euo pipefail
DATA=${1:-data/demo/prepared}
OUT=${2:-runs/bench_generate}
PORT=${BENCH_PORT:-29641}
RUN=$OUT/run
if [ ! -f "$RUN/checkpoints/latest" ]; then
    deepspeed --num_gpus 2 --master_port "$PORT" --module pretrain.train stage=palm model=base data.dir="$DATA" \
        run.dir="$RUN" train.max_steps=1 train.micro_batch_size=1 train.eval_samples=2 'stage.src_len=[32,64]' \
        'stage.tgt_len=[32,64]' logger.progress=false logger.wandb.mode=disabled >"$OUT.train.log" 2>&1
fi
python3 data/held_out_prompts.py --prepared "$DATA" --count 8 --out "$OUT/prompts.txt" >/dev/null
ARGS=(run.dir="$RUN" prompts_file="$OUT/prompts.txt" max_new_tokens=32 strategy=greedy batch_size=4)
echo "model=base stage two, $(python3 -c "import json; print(json.load(open('$RUN/run.json'))['parameters'])") parameters, 8 prompts, 32 new tokens, batch 4, CPU fp32"
printf '1 rank:        '; python3 -m pretrain.generate "${ARGS[@]}" 2>&1 >/dev/null | grep -o 'weights held per rank.*'
printf '2 ranks:       '; deepspeed --num_gpus 2 --master_port "$PORT" --module pretrain.generate "${ARGS[@]}" 2>&1 \
    | grep -o 'weights held per rank.*'
printf '2 ranks, at most 20M parameters gathered (max_live_parameters): '
deepspeed --num_gpus 2 --master_port "$PORT" --module pretrain.generate "${ARGS[@]}" max_live_parameters=20000000 2>&1 \
    | grep -o 'weights held per rank.*'
printf 'consolidated:  '; python3 - "$RUN" <<'PY'
import resource, sys
from pretrain.generate import load_model
load_model(sys.argv[1], None)
print(f"peak memory of one process holding the consolidated model (GiB): [{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f}]")
PY
