#!/usr/bin/env bash
# The MDLM reference of the decoding benchmark (about 40 minutes on 2 CPU cores), in four stages:
#   1. a BD3-LM on the checkable tasks (block size 8; it learns them fastest),
#   2. an MDLM initialised from it (same backbone, --init-from across objectives), wrap packing,
#   3. LLaDA-style SFT (--pack sft: prompt given, answer + EOS filler scored) on 320-token rows,
#   4. the same on 1088-token rows, so canvases of prompt + 1024 are within the trained lengths.
#   bash evals/train_reference_mdlm.sh [OUT_DIR]      -> OUT_DIR/mdlm-sft1088/mdlm/model
set -euo pipefail
OUT=${1:-runs/reference}
HERE=$(dirname "$0")
bash "$HERE/train_reference.sh" "$OUT" 2000 tiny bd3lm
TOK="$OUT/bd3lm/tokenizer"
bash "$HERE/train_reference.sh" "$OUT/mdlm-init" 1500 tiny mdlm wrap 256 "$TOK" "$OUT/bd3lm/model"
bash "$HERE/train_reference.sh" "$OUT/mdlm-sft320" 1500 tiny mdlm sft 320 "$TOK" "$OUT/mdlm-init/mdlm/model"
bash "$HERE/train_reference.sh" "$OUT/mdlm-sft1088" 600 tiny mdlm sft 1088 "$TOK" "$OUT/mdlm-sft320/mdlm/model"
