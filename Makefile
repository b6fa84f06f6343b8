# toonark: diffusers folder -> ONNX -> engines -> Triton. `make help` lists the targets.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
MODEL       ?= build/tiny-pipeline
OUT         ?= build/tiny
BACKEND     ?= ort-cpu
PRECISION   ?= fp32
HTTP_PORT   ?= 8000
GRPC_PORT   ?= 8001
METRICS_PORT?= 8002
HOST        ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: help setup demo test tiny export calibrate engine repo serve trtexec bench clean safety-model safety-eval

help:
	@echo "make setup                      venv with CPU torch, optimum export set, Triton bundle, tests"
	@echo "make demo                       tiny pipeline -> export -> engine -> repo -> server -> out/demo.png"
	@echo "make test                       the test suite (real tritonserver included)"
	@echo "make tiny MODEL=dir             a random-weight diffusers folder (tests, demo)"
	@echo "make export MODEL=dir OUT=dir   ONNX fp32 + fp16 with parity report"
	@echo "make calibrate OUT=dir          INT8 UNet calibration + quality gate"
	@echo "make engine OUT=dir BACKEND=ort-cpu|ort-cuda|tensorrt PRECISION=fp32|fp16|int8"
	@echo "make repo OUT=dir               Triton model repository for the built engines"
	@echo "make serve OUT=dir HTTP_PORT= GRPC_PORT= METRICS_PORT="
	@echo "make trtexec OUT=dir            print trtexec / polygraphy command lines"
	@echo "make bench                      per-stage and end-to-end benchmark (JSON in benchmarks/results/)"
	@echo "make safety-model               retrain the prompt-safety classifier from toonark/data/safety_prompts.json"
	@echo "make safety-eval                prompt-safety precision/recall per category on the test part"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys, sysconfig; assert sys.version_info[:2] >= (3, 10), "need Python >= 3.10"; assert sysconfig.get_config_var("Py_ENABLE_SHARED"), "tritonserver Python backend needs a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,safety-model]'
	# Only for its CLIP BPE vocabulary file; never imported (it would pull torchvision).
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

setup: $(VENV)/.installed

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
	$(PY) scripts/serve.py --repo $(OUT)/triton_model_repo --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

trtexec: setup
	$(PY) scripts/trtexec.py --out $(OUT)

bench: setup
	$(PY) scripts/bench.py

# Build-time only (scikit-learn + skl2onnx, the safety-model extra); the runtime needs onnxruntime alone.
safety-model: setup
	$(PY) scripts/safety_model.py

safety-eval: setup
	$(PY) scripts/safety_eval.py --split test

clean:
	rm -rf build out
