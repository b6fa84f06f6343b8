#!/usr/bin/env bash
# The toonark container's entry point (deploy/Dockerfile; README "Run in a cluster").
#   build            engines for THIS GPU from the exported ONNX in $TOONARK_BUILD (skipped when up to date),
#                    then the model repository ($TOONARK_REPO): what `make engine` + `make repo` do
#   serve            the toonark launcher on $TOONARK_REPO (scripts/serve.py: the tritonserver flags of
#                    `make serve`: explicit model control, metrics, restricted admin APIs,
#                    the Python-stub watchdog), listening on 0.0.0.0
#   build-and-serve  both (docker run / compose); on Kubernetes a Job builds once and the pods only serve
#   warmup           one request through the ensemble: exits 0 once the server answers (the startupProbe)
# Settings (environment): TOONARK_BUILD (default /models/build), TOONARK_LAYOUT tensorrt_plan (default) |
# onnxruntime_onnx | python, TOONARK_BACKEND (default: tensorrt for tensorrt_plan, else ort-cuda),
# TOONARK_PRECISION (fp16), TOONARK_REPO (default $TOONARK_BUILD/triton_model_repo), TOONARK_HTTP_PORT /
# TOONARK_GRPC_PORT / TOONARK_METRICS_PORT (unset: the launcher's defaults, the ports the manifests expose).
set -euo pipefail
build_dir=${TOONARK_BUILD:-/models/build}
layout=${TOONARK_LAYOUT:-tensorrt_plan}
precision=${TOONARK_PRECISION:-fp16}
repo=${TOONARK_REPO:-$build_dir/triton_model_repo}
case "$layout" in
  tensorrt_plan) backend=${TOONARK_BACKEND:-tensorrt} ;;
  onnxruntime_onnx|python) backend=${TOONARK_BACKEND:-ort-cuda} ;;
  *) echo "error: TOONARK_LAYOUT=$layout; choose tensorrt_plan, onnxruntime_onnx or python" >&2; exit 2 ;;
esac
ports=()
[ -n "${TOONARK_HTTP_PORT:-}" ] && ports+=(--http-port "$TOONARK_HTTP_PORT")
[ -n "${TOONARK_GRPC_PORT:-}" ] && ports+=(--grpc-port "$TOONARK_GRPC_PORT")
[ -n "${TOONARK_METRICS_PORT:-}" ] && ports+=(--metrics-port "$TOONARK_METRICS_PORT")

build() {
  if [ ! -f "$build_dir/pipeline/toonark.json" ]; then
    echo "error: $build_dir has no pipeline/toonark.json:" \
      "mount the folder \`make export OUT=...\` wrote at $build_dir" >&2
    exit 2
  fi
  python3 -m toonark.scripts.build_engine --out "$build_dir" --backend "$backend" --precision "$precision"
  python3 -m toonark.scripts.make_repo --out "$build_dir" --backend "$backend" --precision "$precision" \
    --layout "$layout" --repo "$repo"
}

serve() {
  exec python3 -m toonark.scripts.serve --repo "$repo" --host 0.0.0.0 "${ports[@]}"
}

case "${1:-build-and-serve}" in
  build) build ;;
  serve) serve ;;
  build-and-serve) build; serve ;;
  warmup)
    exec python3 -m toonark.scripts.generate --url "127.0.0.1:${TOONARK_HTTP_PORT:-8000}" \
      --prompt "a friendly cartoon cat" --out "${TMPDIR:-/tmp}/toonark-warmup.png" --timeout 300 > /dev/null ;;
  *) echo "error: unknown command $1; use build, serve, build-and-serve or warmup" >&2; exit 2 ;;
esac
