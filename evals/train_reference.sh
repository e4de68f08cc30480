#!/usr/bin/env bash
# Reference models for the decoding benchmark and the lm-eval table: an MDLM and a same-size AR
# model trained alike on the checkable tasks of the embedded corpus (offline, CPU-friendly).
#   bash evals/train_reference.sh [OUT_DIR] [STEPS] [SIZE]
set -euo pipefail
OUT=${1:-runs/reference}
STEPS=${2:-2000}
SIZE=${3:-tiny}
COMMON=(--data default-tasks --size "$SIZE" --seq-len 256 --micro-batch 16 --max-steps "$STEPS" --lr 1e-3
        --warmup-steps 100 --vocab-size 2048 --max-positions 1280 --eval-every 500 --save-every 500 --resume)
dlm train --objective mdlm --output-dir "$OUT/mdlm" "${COMMON[@]}"
dlm train --objective ar --output-dir "$OUT/ar" --tokenizer "$OUT/mdlm/tokenizer" "${COMMON[@]}"
