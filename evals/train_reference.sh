#!/usr/bin/env bash
# Reference models for the decoding / serving / constrained benchmarks and the lm-eval table:
# diffusion models and a same-size AR model trained alike on the checkable tasks of the embedded
# corpus (offline, CPU-friendly). The first model trains the tokenizer; the others reuse it.
#   bash evals/train_reference.sh [OUT_DIR] [STEPS] [SIZE] [OBJECTIVES] [PACK] [SEQ_LEN] [TOKENIZER] [INIT_FROM]
#   bash evals/train_reference.sh runs/reference 5000 tiny "mdlm ar"          # about 20 min each, 2 cores
#   bash evals/train_reference.sh runs/reference 5000 tiny "bd3lm e2d2"       # block size 8
#   bash evals/train_reference.sh runs/reference-sft 5000 tiny mdlm sft 320 runs/reference/mdlm/tokenizer
#   bash evals/train_reference.sh runs/reference-sft-init 2000 tiny mdlm sft 320 runs/reference/bd3lm/tokenizer runs/reference/bd3lm/model
# INIT_FROM starts from that model's weights (any objective with the same backbone; see README).
# PACK sft trains prompt -> answer + EOS filler (prompt never noised; see dlm/data.py), the
# LLaDA SFT recipe: a diffusion model then ends its answers with confident EOS runs.
set -euo pipefail
OUT=${1:-runs/reference}
STEPS=${2:-5000}
SIZE=${3:-tiny}
OBJECTIVES=${4:-mdlm ar}
PACK=${5:-wrap}
SEQ_LEN=${6:-256}
TOKENIZER=${7:-}
INIT_FROM=${8:-}
BLOCK=${BLOCK:-8}  # block size of BD3-LM / E2D2 (environment variable)
LR=${LR:-1e-3}     # peak learning rate (environment variable)
COMMON=(--data default-tasks --pack "$PACK" --size "$SIZE" --seq-len "$SEQ_LEN" --micro-batch 16 --max-steps "$STEPS" --lr "$LR"
        --warmup-steps 100 --vocab-size 2048 --max-positions 1280 --eval-every 500 --save-every 500 --resume)
for obj in $OBJECTIVES; do
  extra=()
  case "$obj" in
    bd3lm|e2d2) extra=(--block-size "$BLOCK") ;;
  esac
  tok=()
  init=()
  if [ -n "$INIT_FROM" ]; then init=(--init-from "$INIT_FROM"); fi
  if [ -n "$TOKENIZER" ]; then tok=(--tokenizer "$TOKENIZER")
  elif [ -d "$OUT/mdlm/tokenizer" ] && [ "$obj" != mdlm ]; then tok=(--tokenizer "$OUT/mdlm/tokenizer"); fi
  dlm train --objective "$obj" --output-dir "$OUT/$obj" "${tok[@]}" "${init[@]}" "${extra[@]}" "${COMMON[@]}"
done
