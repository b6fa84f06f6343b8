# Sourced by the device commands (gpu_run.sh, int8_gpu.sh) on the lent GPU machine, from the repo root:
# installs the staged wheel bundle into /tmp/site once per warm machine, lays toonark out as installed
# (toonark.export = export/, ...) under /tmp/tkpkg, and records the GPU's state under $OUT.
# Needs /tmp/parts/bundle.part* (carried by earlier calls) and BUNDLE_SHA (see benchmarks/NOTES.md).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -d /tmp/site ]; then
  cat /tmp/parts/bundle.part* > /tmp/bundle.tar || exit 3
  echo "${BUNDLE_SHA:?set BUNDLE_SHA}  /tmp/bundle.tar" | sha256sum -c --quiet - || exit 3
  mkdir -p /tmp/wheels && tar -xf /tmp/bundle.tar -C /tmp/wheels && rm -f /tmp/bundle.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl || exit 3
fi
rm -rf /tmp/tkpkg && mkdir -p /tmp/tkpkg && cp -r toonark /tmp/tkpkg/
for d in export engines calibration triton_model_repo serving benchmarks scripts; do [ -d "$d" ] && cp -r "$d" "/tmp/tkpkg/toonark/$d"; done
export PYTHONPATH=/tmp/tkpkg:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv > "$OUT/nvidia-smi.csv" 2>&1
