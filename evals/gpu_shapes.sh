#!/usr/bin/env bash
# The published models' real shapes on one GPU, random weights, speed only (issue 17): LLaDA-8B
# in bf16 (no cache / prefix / dual cache, 256 and 1024 new tokens, 4 tokens per step) and SDAR-4B
# (no cache / exact cache). About 5 minutes on one H100 / H200. Needs torch, transformers,
# safetensors and rich; nothing is installed (the package tree is assembled under $TMPDIR).
#
#   OUT=runs/gpu bash evals/gpu_shapes.sh        # JSON per shape under $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PKG=$(mktemp -d)
cp -r dlm "$PKG/dlm"
for d in training serving evals; do cp -r "$d" "$PKG/dlm/$d"; done
export PYTHONPATH="$PKG" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m dlm.cli bench decode --random-init llada-8b --dtype bfloat16 --device cuda --lengths 256,1024 \
    --batch-size 1 --repeats 2 --tokens-per-step 4 --out "$OUT/llada8b_bf16.json"
python -m dlm.cli bench decode --random-init sdar-4b --dtype bfloat16 --device cuda --lengths 256,1024 \
    --batch-size 1 --repeats 2 --tokens-per-step 4 --out "$OUT/sdar4b_bf16.json"
