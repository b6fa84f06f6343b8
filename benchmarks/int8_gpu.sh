#!/usr/bin/env bash
# The device command for benchmarks/int8_gpu.py (INT8 QDQ vs fp16 UNet on ORT's CUDA EP, issue 5):
#   BUNDLE_SHA=<sha> bash benchmarks/int8_gpu.sh [int8_gpu.py args]    # ~6-9 min on the H100
# Needs the wheel bundle of benchmarks/gpu_run.sh (onnxruntime-gpu 1.31.1, diffusers 0.39.0,
# transformers 4.57.6, huggingface_hub 0.36.2, tokenizers 0.22.1, optimum 2.1.0, optimum-onnx 0.1.0)
# joined under /tmp/parts by earlier calls on the same warm machine (see benchmarks/NOTES.md).
# toonark is copied into /tmp/tkpkg in the installed layout, as gpu_run.sh does. JSON + log under $OUT.
set -uo pipefail
. benchmarks/device_env.sh
echo "staged in ${SECONDS} s"
budget=${INT8_BUDGET_S:-585}          # the device tool's per-command limit is 600 s
left=$((budget - SECONDS))
timeout "$left" python3 benchmarks/int8_gpu.py --work /tmp/int8work --results "$OUT" \
  --deadline-s $((left - 15)) "$@" 2>&1 | tee "$OUT/int8.log"
rc=${PIPESTATUS[0]}
df -h /tmp | tail -1 >> "$OUT/int8.log"
exit "$rc"
