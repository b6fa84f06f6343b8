# Sourced by the device commands (gpu_run.sh, int8_gpu.sh, triton_gpu.sh) on an offline GPU machine, from the
# repo root, after the one setup sequence of benchmarks/NOTES.md ("Offline GPU machines"):
#   python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels && make setup GPU=1 WHEELS=/tmp/wheels
# Puts that venv first on PATH (python3 = .venv's: numpy 1.26, onnxruntime-gpu, toonark editable from this
# checkout; the image's CUDA torch after them) and records the GPU's state under $OUT.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -f .venv/.installed-gpu-offline ] && [ ! -f .venv/.installed-gpu ]; then
  echo "error: no GPU venv here: run the setup sequence of benchmarks/NOTES.md (make setup GPU=1 WHEELS=...) first" >&2
  exit 3
fi
export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false USE_FLAX=0 USE_JAX=0 USE_TF=0
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv > "$OUT/nvidia-smi.csv" 2>&1
