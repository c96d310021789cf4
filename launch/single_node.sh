#!/usr/bin/env bash
# One node, N ranks, through torchrun (a free port is picked: --standalone).
#   launch/single_node.sh --model pruned/ --data builtin:wiki --tokens 50M --out run/
#   NGPU=4 MICRO_BATCH=8 launch/single_node.sh --model pruned/ --data corpus.jsonl --tokens 1B --out run/
#   NGPU=0 NPROC=2 launch/single_node.sh --model pruned/ --data builtin:wiki --tokens 200K --seq-len 256 --out run/   # CPU, gloo
# Every flag after the script name goes to `prunext train` and overrides the defaults below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCHRUN=${TORCHRUN:-torchrun}
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
if [[ "$NGPU" -gt 0 ]]; then
  NPROC=${NPROC:-$NGPU}
  CONFIG=${CONFIG:-$ROOT/ds_configs/zero3.json}
else
  NPROC=${NPROC:-1}
  CONFIG=${CONFIG:-$ROOT/ds_configs/zero3_cpu.json}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

launcher=("$TORCHRUN" --standalone --nproc_per_node "$NPROC")
batch=(--seq-len "${SEQ_LEN:-1024}" --micro-batch "${MICRO_BATCH:-4}" --grad-accum "${GRAD_ACCUM:-1}")
run=(--deepspeed "$CONFIG" --save-every "${SAVE_EVERY:-500}" --log-every "${LOG_EVERY:-10}")

exec "${launcher[@]}" "$ROOT/launch/train.py" "${batch[@]}" "${run[@]}" "$@"
