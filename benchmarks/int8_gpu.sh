#!/usr/bin/env bash
# The device command for benchmarks/int8_gpu.py (INT8 QDQ vs fp16 UNet on ORT's CUDA EP, issue 5):
#   bash benchmarks/int8_gpu.sh [int8_gpu.py args]    # ~6-9 min on the H100
# Needs the GPU venv of benchmarks/NOTES.md ("Offline GPU machines"; device_env.sh checks it and puts it first
# on PATH). JSON + log under $OUT.
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
