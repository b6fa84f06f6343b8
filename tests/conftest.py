"""Session fixtures: one tiny pipeline, exported once, shared by every test that needs it.

Each stage fixture calls the same library function the Makefile's target calls, so the
tests exercise the real path (`make tiny`, `make export`, `make engine`, `make repo`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from toonark.specs import ShapeLimits


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
        return list(onnxruntime.get_available_providers())
    except ImportError as err:
        return [f"none (import onnxruntime failed: {err})"]


def _tensorrt_error() -> str | None:
    """None when a supported TensorRT imports, else why not (the product's own message)."""
    from toonark.engines.tensorrt import import_tensorrt
    try:
        import_tensorrt()
    except RuntimeError as err:
        return str(err)
    return None


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def gpu_skip_reason(markers: set[str], ort_providers: list[str], tensorrt_error: str | None,
                    torch_cuda: bool) -> str | None:
    """Why a test with these markers cannot run here, or None. Each marker names what it needs, so a machine
    with TensorRT but CPU onnxruntime still runs the TensorRT tests, and a skip says exactly what is missing."""
    if "tensorrt" in markers:
        if tensorrt_error:
            return f"needs TensorRT: {tensorrt_error}"
        if not torch_cuda:
            return ("needs a CUDA GPU and a CUDA build of torch (TrtEngine's buffers are torch CUDA tensors): "
                    "torch.cuda.is_available() is False")
    if "gpu" in markers and "CUDAExecutionProvider" not in ort_providers:
        return f"needs a CUDA GPU with onnxruntime-gpu: onnxruntime here has {ort_providers}"
    return None


def pytest_collection_modifyitems(config, items):
    probes = {}   # each probe runs once, and only when a collected test needs it
    for item in items:
        markers = {name for name in ("gpu", "tensorrt") if name in item.keywords}
        if not markers:
            continue
        if not probes:
            probes = {"ort_providers": _ort_providers(), "tensorrt_error": _tensorrt_error(),
                      "torch_cuda": _torch_cuda()}
        reason = gpu_skip_reason(markers, **probes)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


# The targets' reading of the test part (evaluate.target_sample, 34.5 k prompts through the shipped filter, one at a
# time as served: ~141 s alone on two processes on 2 cores) starts when the suite is collected, its workers at
# niceness 19: it takes the CPU the server and build tests leave idle, and the targets test collects it
# (test_prompt_safety_eval.py).
TARGETS_READING = pytest.StashKey()
TARGETS_FIXTURE = "shipped_on_test_part"


def pytest_collection_finish(session):
    if session.config.option.collectonly or not any(TARGETS_FIXTURE in getattr(item, "fixturenames", ())
                                                    for item in session.items):
        return
    from toonark.prompt_safety import evalset, evaluate
    session.config.stash[TARGETS_READING] = evaluate.ShippedEvaluation(evaluate.target_sample(evalset.load()),
                                                                        "test", nice=19)


def pytest_sessionfinish(session):
    pending = session.config.stash.get(TARGETS_READING, None)
    if pending is not None:
        pending.reading.close()


# Small limits keep the tiny pipeline's CPU work short; production defaults are 256..768.
TEST_LIMITS = ShapeLimits(min_batch=1, opt_batch=1, max_batch=2, min_image=64, opt_image=128, max_image=256,
                          image_step=64)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from toonark.export.pipelines import build_pipeline
    return build_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-pipeline", kind="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_build(tiny_model, tmp_path_factory) -> Path:
    """A build folder with fp32 and fp16 ONNX exports of the tiny pipeline."""
    from toonark.export.onnx_export import export_pipeline
    out = tmp_path_factory.mktemp("build") / "tiny"
    export_pipeline(tiny_model, out, precisions=("fp32", "fp16"), limits=TEST_LIMITS)
    return out


@pytest.fixture(scope="session")
def tiny_engines(tiny_build) -> Path:
    """ORT CPU fp32 engines built into the tiny build folder."""
    from toonark.engines.build import build_engines
    build_engines(tiny_build, backend="ort-cpu", precision="fp32")
    return tiny_build


# --- Qwen-Image (issue 17): the tiny random folder, its export and ORT CPU engines ---------------------
# Tiny limits: 64..128 px in steps of 16 (the VAE's 8 px per latent x 2x2 patches), up to 96 text tokens.
QWEN_LIMITS = ShapeLimits(min_batch=1, opt_batch=1, max_batch=2, min_image=64, opt_image=96, max_image=128,
                          image_step=16, min_text=1, opt_text=24, max_text=96)


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory) -> Path:
    from toonark.export.qwen_pipelines import build_qwen_pipeline
    return build_qwen_pipeline(tmp_path_factory.mktemp("qwen") / "qwen-tiny", kind="qwen-image", seed=0)


@pytest.fixture(scope="session")
def qwen_build(qwen_model, tmp_path_factory) -> Path:
    """`make export` of the tiny Qwen-Image folder: fp32 + fp16, parity-checked."""
    from toonark.export.onnx_export import export_pipeline
    out = tmp_path_factory.mktemp("qwen-build") / "qwen"
    export_pipeline(qwen_model, out, precisions=("fp32", "fp16"), limits=QWEN_LIMITS)
    return out


@pytest.fixture(scope="session")
def qwen_engines(qwen_build) -> Path:
    from toonark.engines.build import build_engines
    build_engines(qwen_build, backend="ort-cpu", precision="fp32")
    return qwen_build
