#!/usr/bin/env bash
# The product path + Triton ensemble on a lent GPU (see benchmarks/NOTES.md, "Triton on the H100").
#   bash benchmarks/triton_gpu.sh prepare   # SD-1.5-shaped build: fp32 export ->
#                                           # `make engine BACKEND=ort-cuda PRECISION=fp16` (fused) -> pipeline timings -> repo
#   bash benchmarks/triton_gpu.sh triton    # tritonserver (pytriton bundle) from the GPU venv: HTTP + gRPC timings
#   bash benchmarks/triton_gpu.sh gputests  # the @pytest.mark.gpu tests
# Needs the GPU venv of benchmarks/NOTES.md ("Offline GPU machines": carried wheel parts, then
# `make setup GPU=1 WHEELS=/tmp/wheels`); device_env.sh puts it first on PATH. The tokenizer and scheduler of
# the build come from `make tiny` (build/tiny-pipeline), made here on the first run.
set -uo pipefail
phase=${1:-prepare}
BUILD=${BUILD:-/tmp/tkbuild}
. benchmarks/device_env.sh
[ -f build/tiny-pipeline/model_index.json ] || python3 scripts/tiny.py --out build/tiny-pipeline > /dev/null || exit 3
case "$phase" in
  prepare)
    ( timeout ${BUILD_TIMEOUT:-380} python3 benchmarks/gpu_product.py build "$BUILD" 2>&1 | grep -v "TracerWarning\|^  \|fusion:\|Warning:" ) | tee "$OUT/prepare.log"
    ls -la "$BUILD"/engines/*/* >> "$OUT/prepare.log" 2>&1
    timeout 40 python3 benchmarks/gpu_product.py repo "$BUILD" 2>&1 | tail -3
    timeout ${PIPE_TIMEOUT:-120} python3 benchmarks/gpu_product.py pipeline "$BUILD" 2>&1 | tee -a "$OUT/prepare.log" | grep -v "^  " ;;
  triton)
    # Not from the checkout: the stubs put their cwd first on sys.path, and ./toonark (core only) would shadow
    # the installed package (toonark.triton_model_repo...).
    here=$PWD; cd /tmp
    timeout ${TRITON_TIMEOUT:-420} python3 "$here/benchmarks/triton_gpu.py" "$BUILD/triton_model_repo" --reps ${REPS:-7} 2>&1 | tee "$OUT/triton-run.log"
    cd "$here"
    grep -i "error\|warn\|unet\|fail" "$OUT/triton.log" | head -30 ;;
  gputests)
    timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore --tb=short -p no:warnings \
      ${GPU_TESTS:-tests/test_engines.py tests/test_fusions.py tests/test_gpu_path.py} > "$OUT/gputests.log" 2>&1; grep -E "^E |Error|passed|failed|^FAILED|^_____" "$OUT/gputests.log" | grep -v "^E   *$" | head -60 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
