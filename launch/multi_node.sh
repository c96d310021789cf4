#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile (see launch/hostfile.example).
# With ssh (run once, on the first node; it reaches every host by passwordless ssh/pdsh):
#   HOSTFILE=launch/hostfile launch/multi_node.sh --model pruned/ --data corpus.jsonl --tokens 1B --out /shared/run/
# Without ssh (a scheduler starts this script once per node; same hostfile everywhere):
#   NODE_RANK=$SLURM_NODEID MASTER_ADDR=node-0 launch/multi_node.sh --model pruned/ --data corpus.jsonl --tokens 1B --out /shared/run/
# --out must be on a file system every node sees. Environment for remote ranks: .deepspeed_env (docs/training.md).
# Every flag after the script name goes to `prunext train` and overrides the defaults below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEEPSPEED=${DEEPSPEED:-deepspeed}
HOSTFILE=${HOSTFILE:-$ROOT/launch/hostfile}
CONFIG=${CONFIG:-$ROOT/ds_configs/zero3.json}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ ! -f "$HOSTFILE" ]]; then
  echo "multi_node.sh: no hostfile at $HOSTFILE; copy launch/hostfile.example and list your nodes, or set HOSTFILE" >&2
  exit 2
fi

launcher=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${NODE_RANK:-}" ]]; then
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "multi_node.sh: NODE_RANK without ssh needs MASTER_ADDR (the first node's address)" >&2
    exit 2
  fi
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
batch=(--seq-len "${SEQ_LEN:-2048}" --micro-batch "${MICRO_BATCH:-4}" --grad-accum "${GRAD_ACCUM:-1}")
run=(--deepspeed "$CONFIG" --save-every "${SAVE_EVERY:-500}" --log-every "${LOG_EVERY:-10}")

exec "${launcher[@]}" "$ROOT/launch/train.py" "${batch[@]}" "${run[@]}" "$@"
