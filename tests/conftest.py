"""Session fixtures: one tiny pipeline, exported once, shared by every test that needs it.

Each stage fixture calls the same library function the Makefile's target calls, so the
tests exercise the real path (`make tiny`, `make export`, `make engine`, `make repo`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from toonark.specs import ShapeLimits


def _has_cuda() -> bool:
    try:
        import onnxruntime
        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with onnxruntime-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
