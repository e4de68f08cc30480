#!/usr/bin/env bash
# The prepared GPU check (issues 17 and 18), one call on one GPU, everything under $OUT; its
# time limits add up to 450 s (7.5 minutes, plus a few seconds of setup):
#
#   gpu.txt                 the card (nvidia-smi)
#   cuda_tests.txt          the test suite's CUDA-marked tests (tests/test_cuda.py: CPU tokens in
#                           float32 for every cache, also with Flex block masks in the decode
#                           steps; bfloat16 decoding; training's FlexAttention = dense)
#   llada8b_bf16.json       LLaDA-8B shape, random weights, bf16, batch 1, 4 tokens per step:
#                           vanilla vs prefix vs dual cache at 256 and 1024 new tokens, and the
#                           same-shape AR model through HF generate with its static cache;
#                           tokens/s, forwards/s, ms per step, weights read per second against the
#                           card's copy bandwidth measured in the same run, peak memory
#   sdar4b_bf16.json        SDAR-4B shape (block-causal, block 4): no cache vs the exact cache
#   sdar4b_bf16_graphs.json the exact cache's block step compiled and replayed as CUDA graphs
#                           (--compile: torch.compile reduce-overhead, bucketed step shapes)
#   summary.txt             the figures the issues ask for (step cost ratio, bandwidth fraction)
#
#   OUT=runs/gpu bash evals/gpu_check.sh
#
# Nothing is installed: the package tree is assembled under $TMPDIR and put on PYTHONPATH (the GPU
# machine has torch and transformers; pytest and rich are used when present).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PKG=$(mktemp -d)
cp -r dlm "$PKG/dlm"
for d in training serving evals; do cp -r "$d" "$PKG/dlm/$d"; done
# PYTHONSAFEPATH: the working directory (this checkout, whose dlm/ has no evals/) must not hide $PKG
export PYTHONPATH="$PKG" PYTHONSAFEPATH=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

if python -c "import pytest" 2>/dev/null; then
    timeout 130 python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1
    echo "cuda tests: exit $?" | tee -a "$OUT/cuda_tests.txt"
else
    echo "pytest is not installed on this machine: the CUDA tests did not run" | tee "$OUT/cuda_tests.txt"
fi

timeout 170 python -m dlm.cli bench decode --random-init llada-8b --dtype bfloat16 --device cuda \
    --lengths 256,1024 --batch-size 1 --repeats 2 --tokens-per-step 4 --block-length 32 --ar-baseline \
    --out "$OUT/llada8b_bf16.json" 2>&1 | tee "$OUT/llada8b_bf16.log"
timeout 70 python -m dlm.cli bench decode --random-init sdar-4b --dtype bfloat16 --device cuda \
    --lengths 256,1024 --batch-size 1 --repeats 2 --tokens-per-step 4 \
    --out "$OUT/sdar4b_bf16.json" 2>&1 | tee "$OUT/sdar4b_bf16.log"
timeout 80 python -m dlm.cli bench decode --random-init sdar-4b --dtype bfloat16 --device cuda \
    --lengths 256 --batch-size 1 --repeats 2 --tokens-per-step 4 --configs "exact cache" --compile \
    --out "$OUT/sdar4b_bf16_graphs.json" 2>&1 | tee "$OUT/sdar4b_bf16_graphs.log"

python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
for name in ("llada8b_bf16", "sdar4b_bf16", "sdar4b_bf16_graphs"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        print(f"{name}: no result (see {name}.log)")
        continue
    r = json.load(open(path))
    print(f"{name}: {r['parameters'] / 1e9:.2f}B parameters, weights {r['weight_bytes'] / 2**30:.1f} GiB, "
          f"card copy bandwidth {r['device_copy_bytes_per_s'] / 1e9:.0f} GB/s")
    for x in r["results"]:
        ratio = x.get("step_cost_vs_no_cache")
        print(f"  {x['length']:5d} {x['config']:32s} {x['tokens_per_s']:8.1f} tok/s {x['ms_per_step']:8.2f} ms/step"
              f"  step cost vs no cache {'-' if ratio is None else f'{ratio:.3f}'}"
              f"  weights {x['weight_bytes_per_s'] / 1e9:6.0f} GB/s = {x['bandwidth_fraction']:.0%} of copy"
              f"  peak {x['peak_memory_bytes'] / 2**30:.1f} GiB")
EOF
