#!/usr/bin/env bash
# One H200 session, phase by phase (each phase is one device call on the same warm machine; benchmarks/NOTES.md):
#   bash benchmarks/gpu_session.sh carry N     # after carrying .stage/gpu/pN (scripts/stage_wheels.py stage)
#   bash benchmarks/gpu_session.sh setup       # join the parts, `make setup GPU=1 WHEELS=/tmp/wheels`, gpu_check
#   bash benchmarks/gpu_session.sh prepare     # SD-1.5-shaped ort-cuda fp16 build in /tmp/tkbuild + pipeline timings
#   bash benchmarks/gpu_session.sh served [TREE]   # issue 12: benchmarks/gpu_served.py (TREE: a checkout to run it from)
#   bash benchmarks/gpu_session.sh edits       # issues 14 + 15: gpu_lora.py, gpu_tiles.py
#   bash benchmarks/gpu_session.sh lora        # issue 14 alone: gpu_lora.py
#   bash benchmarks/gpu_session.sh qwen        # issue 17: gpu_qwen.py
# Results: $OUT/<phase>.tgz (the JSON files) and the tables on stdout.
set -uo pipefail
# The image has jax/flax built for numpy 2; diffusers/transformers would import them next to the venv's numpy 1.26.
export USE_FLAX=0 USE_JAX=0 USE_TF=0
phase=$1; shift
OUT=${OUT:-/tmp/out}; BUILD=${BUILD:-/tmp/tkbuild}; RES=/tmp/res/$phase
mkdir -p "$OUT" "$RES"
pack() { tar czf "$OUT/$phase.tgz" -C "$RES" . 2>/dev/null; ls -la "$RES" | tail -n +2; }
case "$phase" in
  carry)
    mkdir -p /tmp/parts && cp -r ".stage/gpu/p$1" /tmp/parts/ && du -sh "/tmp/parts/p$1" ;;
  setup)
    python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels || exit 3
    make setup GPU=1 WHEELS=/tmp/wheels > "$RES/setup.log" 2>&1; rc=$?
    tail -15 "$RES/setup.log"; cp .venv/gpu-check.json "$RES/" 2>/dev/null
    [ -f build/tiny-pipeline/model_index.json ] || .venv/bin/python scripts/tiny.py --out build/tiny-pipeline > /dev/null
    pack; exit $rc ;;
  prepare)
    OUT=$RES BUILD=$BUILD bash benchmarks/triton_gpu.sh prepare 2>&1 | tail -25; pack ;;
  served)
    . benchmarks/device_env.sh > /dev/null
    tree=${1:-.}
    [ "$tree" = . ] || python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" > /dev/null
    # SERVED_ARGS: more gpu_served.py options (e.g. --configs batched,single --idle-unload 3)
    (cd "$tree" && timeout ${SERVED_TIMEOUT:-420} python3 benchmarks/gpu_served.py --build "$BUILD" --out "$RES" \
       ${SERVED_ARGS:-}) 2>&1 \
      | grep -v "^  \|Warning" | tail -60
    [ "$tree" = . ] || python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null
    pack ;;
  lora)
    . benchmarks/device_env.sh > /dev/null
    timeout ${LORA_TIMEOUT:-240} python3 benchmarks/gpu_lora.py --build "$BUILD" --out "$RES" 2>&1 | tail -25
    pack ;;
  edits)
    . benchmarks/device_env.sh > /dev/null
    timeout ${LORA_TIMEOUT:-240} python3 benchmarks/gpu_lora.py --build "$BUILD" --out "$RES/lora" 2>&1 | tail -25
    timeout ${TILES_TIMEOUT:-240} python3 benchmarks/gpu_tiles.py --build "$BUILD" --out "$RES/tiles" 2>&1 | tail -25
    pack ;;
  qwen)
    . benchmarks/device_env.sh > /dev/null
    timeout ${QWEN_TIMEOUT:-300} python3 benchmarks/gpu_qwen.py --out "$RES/torch" --no-ort 2>&1 | tail -25
    timeout ${QWEN_ORT_TIMEOUT:-240} python3 benchmarks/gpu_qwen.py --out "$RES/ort" --dtypes fp16 --compile-dtypes "" 2>&1 | tail -25
    pack ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
