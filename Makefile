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
SETUP_STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu$(if $(WHEELS),-offline,),)

.PHONY: help setup demo test tiny export calibrate engine repo serve trtexec bench clean

help:
	@echo "make setup                      venv with CPU torch, optimum export set, Triton bundle, tests"
	@echo "make setup GPU=1 [WHEELS=dir]   the same with onnxruntime-gpu + CUDA torch, checked on the GPU"
	@echo "make demo                       tiny pipeline -> export -> engine -> repo -> server -> out/demo.png"
	@echo "make test                       the test suite (real tritonserver included)"
	@echo "make tiny MODEL=dir             a random-weight diffusers folder (tests, demo)"
	@echo "make export MODEL=dir OUT=dir   ONNX fp32 + fp16 with parity report"
	@echo "make calibrate OUT=dir          INT8 UNet calibration + quality gate"
	@echo "make engine OUT=dir BACKEND=ort-cpu|ort-cuda|tensorrt PRECISION=fp32|fp16|int8"
	@echo "make repo OUT=dir               Triton model repository for the built engines"
	@echo "make serve OUT=dir HTTP_PORT= GRPC_PORT= METRICS_PORT= [IDLE_UNLOAD_S=N]"
	@echo "make trtexec OUT=dir            print trtexec / polygraphy command lines"
	@echo "make bench                      per-stage and end-to-end benchmark (JSON in benchmarks/results/)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys, sysconfig; assert sys.version_info[:2] >= (3, 10), "need Python >= 3.10"; assert sysconfig.get_config_var("Py_ENABLE_SHARED"), "tritonserver Python backend needs a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Only for its CLIP BPE vocabulary file; never imported (it would pull torchvision).
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

# The CUDA check runs first (no driver: stop before downloading GBs) and last (provider listed, tiny session
# runs on it); its report stays in $(VENV)/gpu-check.json.
$(VENV)/.installed-gpu: pyproject.toml requirements-gpu.txt
	$(PYTHON) scripts/gpu_check.py --driver-only
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
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
	$(PY) scripts/gpu_check.py --json $(VENV)/gpu-check.json
	touch $@ $(VENV)/.installed   # later targets (make test / serve / bench) need no GPU=1

setup: $(SETUP_STAMP)

demo: setup
	$(PY) scripts/demo.py --model $(MODEL) --out $(OUT) --image out/demo.png

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

tiny: setup
	$(PY) scripts/tiny.py --out $(MODEL)

export: setup
	@[ -d "$(MODEL)" ] || [ "$(MODEL)" != "build/tiny-pipeline" ] || $(PY) scripts/tiny.py --out $(MODEL)
	$(PY) scripts/export.py --model $(MODEL) --out $(OUT)

calibrate: setup
	# The sampler that captures UNet inputs runs on the fp32 CPU engines (skipped when up to date).
	$(PY) scripts/build_engine.py --out $(OUT) --backend ort-cpu --precision fp32
	$(PY) scripts/calibrate.py --out $(OUT)

engine: setup
	$(PY) scripts/build_engine.py --out $(OUT) --backend $(BACKEND) --precision $(PRECISION)

LAYOUT      ?= python
repo: setup
	$(PY) scripts/make_repo.py --out $(OUT) --backend $(BACKEND) --precision $(PRECISION) --layout $(LAYOUT)

serve: setup
	$(PY) scripts/serve.py --repo $(OUT)/triton_model_repo $(if $(HOST),--host $(HOST)) $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT)) $(if $(IDLE_UNLOAD_S),--idle-unload-s $(IDLE_UNLOAD_S))

trtexec: setup
	$(PY) scripts/trtexec.py --out $(OUT)

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf build out
