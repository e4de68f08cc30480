#!/usr/bin/env bash
# The block-diffusion reference for "BD3-LM against the same-size AR model at equal accuracy"
# (README: decoding): a BD3-LM adapted from the AR model, the recipe of AR-to-diffusion adaptation
# (the AR weights are a good start for a block-causal model of the same backbone).
#   bash evals/train_reference_block.sh [OUT_DIR]      # about 80 min on 2 cores, 5 models
# 1. BD3-LM from scratch, wrap-packed (trains the tokenizer; the from-scratch baseline)
# 2. AR, same size, data and tokenizer, wrap-packed
# 3. AR SFT (prompt -> answer + EOS filler) from 2: the AR baseline of the comparison
# 4. BD3-LM SFT initialised from 3 (--init-from across objectives), 3000 steps
# 5. 1500 more steps from 4 at a lower learning rate (3e-4): the block model compared (README)
set -euo pipefail
OUT=${1:-runs/reference}
HERE=$(dirname "$0")
bash "$HERE/train_reference.sh" "$OUT" 2000 tiny bd3lm
TOK="$OUT/bd3lm/tokenizer"
bash "$HERE/train_reference.sh" "$OUT" 2000 tiny ar wrap 256 "$TOK"
bash "$HERE/train_reference.sh" "$OUT/sft" 1500 tiny ar sft 320 "$TOK" "$OUT/ar/model"
bash "$HERE/train_reference.sh" "$OUT/from-ar" 3000 tiny bd3lm sft 320 "$TOK" "$OUT/sft/ar/model"
LR=3e-4 bash "$HERE/train_reference.sh" "$OUT/from-ar-2" 1500 tiny bd3lm sft 320 "$TOK" "$OUT/from-ar/bd3lm/model"
echo "compare: dlm bench decode $OUT/from-ar-2/bd3lm/model --ar-model $OUT/sft/ar/model --lengths 256,1024 --n-prompts 256"
