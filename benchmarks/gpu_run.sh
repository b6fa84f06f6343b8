#!/usr/bin/env bash
# The device command for `make bench` on a lent GPU (see benchmarks/NOTES.md).
#   bash benchmarks/gpu_run.sh prepare     # SD-1.5-shaped modules -> fp32 ONNX -> fused fp16 (in /tmp/tkwork)
#   bash benchmarks/gpu_run.sh bench [BACKENDS]   # time them all in one process, JSON under $OUT
# Needs the GPU venv of benchmarks/NOTES.md ("Offline GPU machines"; device_env.sh checks it and puts it first
# on PATH): carried wheel parts, then `make setup GPU=1 WHEELS=/tmp/wheels`.
set -uo pipefail
phase=${1:-bench}
backends=${2:-torch-eager,ort,ort-graph,ort-unfused,torch-compile}
. benchmarks/device_env.sh
case "$phase" in
  prepare)
    timeout 570 python3 scripts/bench.py --prepare-only --work /tmp/tkwork --results "$OUT" --tag prepare 2>&1 \
      | grep -v "TracerWarning\|^  \|fusion:" | tee "$OUT/prepare.log"
    ls -la /tmp/tkwork/*/* >> "$OUT/prepare.log" 2>&1 ;;
  bench)
    timeout 580 python3 scripts/bench.py --work /tmp/tkwork --results "$OUT" --tag "${TAG:-run}" --backends "$backends" \
      ${BENCH_ARGS:-} 2>&1 | grep -v "TracerWarning\|^  \|fusion:" | tee "$OUT/bench.log" ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
