#!/usr/bin/env bash
# The product path + Triton ensemble on a lent GPU (see benchmarks/NOTES.md, "Triton on the H100").
#   bash benchmarks/triton_gpu.sh prepare   # install staged wheels, SD-1.5-shaped build: fp32 export ->
#                                           # `make engine BACKEND=ort-cuda PRECISION=fp16` (fused) -> pipeline timings -> repo
#   bash benchmarks/triton_gpu.sh triton    # tritonserver (pytriton bundle) in a numpy-1.26 venv: HTTP + gRPC timings
#   bash benchmarks/triton_gpu.sh gputests  # the @pytest.mark.gpu tests
# Staging: one bundle (b3.tar: onnxruntime-gpu 1.31.1 repacked as ort.tar.xz without the TensorRT provider,
# nvidia-pytriton 0.7.0, numpy 1.26.4, tritonclient 2.73.0 + http deps, diffusers/transformers/optimum for the
# export) split into .stage/q0..q4, carried one part a call into /tmp/parts; BUNDLE_SHA is its sha256.
set -uo pipefail
phase=${1:-prepare}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUILD=${BUILD:-/tmp/tkbuild}
TV=/tmp/tvenv
IMGSITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if [ ! -d /tmp/site ]; then
  cat /tmp/parts/b3.part* > /tmp/b3.tar || exit 3
  echo "${BUNDLE_SHA:?set BUNDLE_SHA}  /tmp/b3.tar" | sha256sum -c --quiet - || exit 3
  mkdir -p /tmp/wheels && tar -xf /tmp/b3.tar -C /tmp/wheels && rm -f /tmp/b3.tar /tmp/parts/b3.part*
  cd /tmp/wheels
  mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    diffusers-*.whl transformers-*.whl huggingface_hub-*.whl tokenizers-*.whl optimum-*.whl optimum_onnx-*.whl || exit 3
  tar -xJf ort.tar.xz -C /tmp/site || exit 3
  python3 -m venv --without-pip "$TV" || exit 3
  TVSITE=$("$TV/bin/python3" -c 'import site; print(site.getsitepackages()[0])')
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$TVSITE" numpy-*.whl nvidia_pytriton-*.whl \
    tritonclient-*.whl python_rapidjson-*.whl gevent-*.whl geventhttpclient-*.whl greenlet-*.whl zope_*.whl brotli-*.whl || exit 3
  tar -xJf ort.tar.xz -C "$TVSITE" || exit 3
  # The stub ignores PYTHONPATH: toonark and the image's packages (torch's CUDA 13 libs, Pillow, tokenizers,
  # grpcio) come in through a .pth, after the venv's own numpy 1.26.
  printf '/tmp/tkpkg\n%s\n' "$IMGSITE" > "$TVSITE/zz_toonark.pth"
  cd - > /dev/null
fi
rm -rf /tmp/tkpkg && mkdir -p /tmp/tkpkg && cp -r toonark /tmp/tkpkg/
for d in export engines calibration triton_model_repo scripts; do [ -d "$d" ] && cp -r "$d" "/tmp/tkpkg/toonark/$d"; done
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$OUT/nvidia-smi.csv" 2>&1
case "$phase" in
  prepare)
    export PYTHONPATH=/tmp/tkpkg:/tmp/site
    ( timeout ${BUILD_TIMEOUT:-380} python3 benchmarks/gpu_product.py build "$BUILD" 2>&1 | grep -v "TracerWarning\|^  \|fusion:\|Warning:" ) | tee "$OUT/prepare.log"
    ls -la "$BUILD"/engines/*/* >> "$OUT/prepare.log" 2>&1
    timeout 40 python3 benchmarks/gpu_product.py repo "$BUILD" 2>&1 | tail -3
    timeout ${PIPE_TIMEOUT:-120} python3 benchmarks/gpu_product.py pipeline "$BUILD" 2>&1 | tee -a "$OUT/prepare.log" | grep -v "^  " ;;
  triton)
    export PATH="$TV/bin:$PATH"
    unset PYTHONPATH
    # Not from the checkout: the stubs put their cwd first on sys.path, and ./toonark (core only) would shadow
    # the installed layout in /tmp/tkpkg (toonark.triton_model_repo...).
    here=$PWD; cd /tmp
    timeout ${TRITON_TIMEOUT:-420} "$TV/bin/python3" "$here/benchmarks/triton_gpu.py" "$BUILD/triton_model_repo" --reps ${REPS:-7} 2>&1 | tee "$OUT/triton-run.log"
    cd "$here"
    grep -i "error\|warn\|unet\|fail" "$OUT/triton.log" | head -30 ;;
  gputests)
    export PYTHONPATH=/tmp/tkpkg:/tmp/site:$PWD/.devcarry/clip
    rm -rf /tmp/tktests && cp -r tests /tmp/tktests && cd /tmp/tktests
    timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore --tb=short -p no:warnings \
      ${GPU_TESTS:-test_engines.py test_fusions.py test_gpu_path.py} > "$OUT/gputests.log" 2>&1; grep -E "^E |Error|passed|failed|^FAILED|^_____" "$OUT/gputests.log" | grep -v "^E   *$" | head -60 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
