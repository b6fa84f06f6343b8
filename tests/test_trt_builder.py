"""The TensorRT path a container user runs first, checked without TensorRT: what engines/tensorrt.py sends to
TensorRT (flags, order, device, timing cache; through tests/trt_recorder.py's RecordingTensorRT, a recording
stand-in for the `tensorrt` module), the supported version range, the int8 flags per submodel, the version
record of a tensorrt_plan repository and the launcher's refusal of another TensorRT. Real plans are built by
the `tensorrt`-marked test in test_engines.py where TensorRT and a GPU are present."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from toonark.engines import build_engines
from toonark.engines.backends import EngineError, backend_for
from toonark.engines.tensorrt import (SUPPORTED_TENSORRT_TEXT, build_trt_engine, check_tensorrt_version, cuda_device,
                                      trt_build_plan)
from toonark.layout import BuildLayout
from toonark.specs import SERVED_SUBMODELS, BuildInfo

from conftest import TEST_LIMITS, gpu_skip_reason
from trt_recorder import RecordingTensorRT, cache_bytes


@pytest.fixture
def build_copy(tiny_build, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(tiny_build, out, ignore=shutil.ignore_patterns("engines", "triton_model_repo"))
    return out


def _unet_plan(build_dir: Path, precision: str = "fp16", **options):
    spec = BuildInfo.read(build_dir).specs["unet"]
    return trt_build_plan(spec, TEST_LIMITS, precision, {"timing_cache": str(BuildLayout(build_dir).timing_cache),
                                                          **options})


def _build_unet(build_dir: Path, trt: RecordingTensorRT, device_id: int = 0, **options) -> Path:
    plan_path = build_dir / "out" / "model.plan"
    build_trt_engine(BuildLayout(build_dir).onnx_model("fp16", "unet"), plan_path, _unet_plan(build_dir, **options),
                     device_id=device_id)
    return plan_path


# --- flags and order ------------------------------------------------------------------------------

def test_fp16_build_sends_the_plan_in_order_on_the_chosen_device(build_copy, monkeypatch):
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    plan_path = _build_unet(build_copy, trt, device_id=1)
    calls = trt.calls
    # The device is current before the builder exists and restored after the build.
    assert calls[:3] == [("cudaGetDevice",), ("cudaSetDevice", 1), ("Builder", 1)]
    assert ("build_serialized_network", 1) in calls and calls[-1] == ("cudaSetDevice", 0)
    assert ("create_network", 0) in calls
    assert [c for c in calls if c[0] in ("set_memory_pool_limit", "builder_optimization_level", "set_flag")] == [
        ("set_memory_pool_limit", "WORKSPACE", 8 << 30), ("builder_optimization_level", 3), ("set_flag", "FP16")]
    # Profiles only for the dynamic inputs (timestep is static, shape [1]).
    assert [c[1] for c in calls if c[0] == "set_shape"] == ["sample", "encoder_hidden_states"]
    assert ("set_shape", "sample", (2, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)) in calls
    # No cache on disk yet: an empty one, checked when attached, saved after the build.
    names = trt.names()
    assert names.index("set_timing_cache") < names.index("build_serialized_network") < names.index("serialize")
    assert ("set_timing_cache", "this-gpu", False, True) in calls
    assert plan_path.read_bytes() == b"RECORDED-PLAN"
    assert BuildLayout(build_copy).timing_cache.read_bytes() == cache_bytes("this-gpu", "tactics-sample")


def test_strongly_typed_and_refit_reach_the_builder(build_copy, monkeypatch):
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    _build_unet(build_copy, trt, strongly_typed=True, refit=True)
    assert ("create_network", 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) in trt.calls
    assert [c[1] for c in trt.calls if c[0] == "set_flag"] == ["REFIT"]


def test_int8_build_sends_int8_flags_only_to_the_qdq_unet(build_copy, monkeypatch):
    """text_encoder and vae_decoder of an int8 build are fp16 graphs without Q/DQ: built as fp16 plans."""
    kind = backend_for("tensorrt")
    info = BuildInfo.read(build_copy)
    flags = {}
    for name in SERVED_SUBMODELS + ("vae_encoder",):
        settings = kind.settings("int8", info.specs[name], info.limits, build_copy, threads=None, device_id=0,
                                 trt_options=None, fuse=False)
        flags[name] = tuple(settings["trt"]["builder_flags"])
        expected_source = (BuildLayout(build_copy).int8_unet if name == "unet"
                           else BuildLayout(build_copy).onnx_model("fp16", name))
        assert kind.source_onnx(BuildLayout(build_copy), "int8", name, fused=False) == expected_source
    assert flags == {"text_encoder": ("FP16",), "unet": ("INT8", "FP16"), "vae_decoder": ("FP16",),
                     "vae_encoder": ("FP16",)}
    # What the builder is sent for the text encoder of an int8 build.
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    settings = kind.settings("int8", info.specs["text_encoder"], info.limits, build_copy, threads=None, device_id=0,
                             trt_options=None, fuse=False)
    kind.build(BuildLayout(build_copy).onnx_model("fp16", "text_encoder"), build_copy / "te", "text_encoder", settings)
    assert [c[1] for c in trt.calls if c[0] == "set_flag"] == ["FP16"]


# --- timing cache ----------------------------------------------------------------------------------

def test_timing_cache_from_another_gpu_is_refused_and_replaced(build_copy, monkeypatch, caplog):
    cache = BuildLayout(build_copy).timing_cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(cache_bytes("other-gpu", "old-tactics"))
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="toonark.engines.tensorrt"):
        plan_path = _build_unet(build_copy, trt)
    attached = [c for c in trt.calls if c[0] == "set_timing_cache"]
    assert attached == [("set_timing_cache", "other-gpu", False, False), ("set_timing_cache", "this-gpu", False, True)]
    assert f"timing cache {cache} was made on another GPU" in caplog.text
    assert plan_path.read_bytes() == b"RECORDED-PLAN"
    # Not merged (combine refuses another GPU's cache): this build's timings replace the file, atomically.
    assert ("combine", "other-gpu", False) in trt.calls
    assert cache.read_bytes() == cache_bytes("this-gpu", "tactics-sample")
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]


def test_unreadable_timing_cache_is_guarded(build_copy, monkeypatch, caplog):
    cache = BuildLayout(build_copy).timing_cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a timing cache")
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="toonark.engines.tensorrt"):
        _build_unet(build_copy, trt)
    assert "is not readable by this TensorRT" in caplog.text
    assert cache.read_bytes() == cache_bytes("this-gpu", "tactics-sample")


def test_timing_cache_of_this_gpu_is_reused_and_merged(build_copy, monkeypatch):
    cache = BuildLayout(build_copy).timing_cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(cache_bytes("this-gpu", "old-tactics"))
    trt = RecordingTensorRT()
    trt.install(monkeypatch)
    _build_unet(build_copy, trt)
    assert [c for c in trt.calls if c[0] == "set_timing_cache"] == [("set_timing_cache", "this-gpu", False, True)]
    assert cache.read_bytes() == cache_bytes("this-gpu", "old-tactics", "tactics-sample")


@pytest.mark.parametrize("failure", ["fail_serialize", "fail_build", "fail_empty_cache"])
def test_nothing_is_written_when_a_step_after_parsing_fails(build_copy, monkeypatch, failure):
    """The plan is written only once the build and the timing cache have both succeeded."""
    cache = BuildLayout(build_copy).timing_cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(cache_bytes("other-gpu", "old-tactics"))
    trt = RecordingTensorRT(**{failure: True})
    trt.install(monkeypatch)
    with pytest.raises(RuntimeError):
        _build_unet(build_copy, trt, device_id=1)
    assert not (build_copy / "out").exists()
    assert cache.read_bytes() == cache_bytes("other-gpu", "old-tactics")
    assert trt.current_device == 0   # the previous device is restored on failure too


# --- versions and devices ------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["10.0.1.6", "10.5.0", "10.13.3.9"])
def test_supported_tensorrt_versions(version):
    check_tensorrt_version(version)


@pytest.mark.parametrize("version, why", [("11.0.0", "TensorRT 11 removed BuilderFlag.FP16/INT8 (weakly typed builds), "
                                                                     "which the fp16 and int8 plans use"),
                                          ("8.6.1", "toonark's builder and runtime use TensorRT 10 APIs")])
def test_tensorrt_outside_the_range_is_refused_before_any_work(build_copy, monkeypatch, version, why):
    RecordingTensorRT(version).install(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        build_engines(build_copy, "tensorrt", "fp16")
    assert str(err.value) == (
        f"TensorRT {version} is not supported: toonark builds with TensorRT {SUPPORTED_TENSORRT_TEXT} ({why}). "
        f"Install it with `pip install 'tensorrt-cu12>=10.0,<11'`, or use deploy/Dockerfile (NGC tritonserver "
        f"24.10, TensorRT 10.5).")
    assert not (build_copy / "engines").exists()


def test_other_device_without_a_cuda_runtime_is_a_clear_error(monkeypatch):
    import sys
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA torch selects the device here")
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)   # `import` of a None entry raises ImportError
    with cuda_device(0):   # CUDA's default device needs no call
        pass
    with pytest.raises(RuntimeError) as err:
        with cuda_device(1):
            pass
    assert str(err.value) == ("device_id 1 needs cuda-python (`pip install cuda-python`) or a CUDA build of torch to "
                              "select the GPU; or run with CUDA_VISIBLE_DEVICES=1 and device id 0")


# --- the served repository records the TensorRT version; the launcher checks it -------------------

def test_tensorrt_plan_repo_records_tensorrt_and_launcher_refuses_another(build_copy, monkeypatch, tmp_path):
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import REPO_RECORD, check_repo_runtime, write_repo
    import json
    RecordingTensorRT("10.5.0").install(monkeypatch)
    build_engines(build_copy, "tensorrt", "fp16")
    repo = write_repo(build_copy, backend="tensorrt", precision="fp16", layout="tensorrt_plan")
    record = json.loads((repo / REPO_RECORD).read_text())
    gpu = backend_for("tensorrt").device_name(0)
    assert record["runtime"] == {"library": {"name": "tensorrt", "version": "10.5.0"}, "device": gpu}
    remake = (f"make engine OUT={build_copy} BACKEND=tensorrt PRECISION=fp16 && "
              f"make repo OUT={build_copy} BACKEND=tensorrt PRECISION=fp16 LAYOUT=tensorrt_plan")
    assert record["remake"] == remake
    check_repo_runtime(repo)   # the TensorRT that built the plans: accepted

    RecordingTensorRT("10.6.0").install(monkeypatch)   # a container with another TensorRT
    server = TritonServer(repo)
    with pytest.raises(EngineError) as err:
        server.start()
    assert str(err.value) == (
        f"{repo.resolve()} holds plans built with TensorRT 10.5.0; this machine has TensorRT 10.6.0, which cannot "
        f"load them. Rebuild the plans and the repository with this machine's TensorRT: `{remake}` (in the "
        f"container: its `build` command)")
    assert server.process is None   # refused before tritonserver started

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)   # no TensorRT at all (the pip server)
    with pytest.raises(EngineError, match=r"serves TensorRT 10\.5\.0 plans, but there is no TensorRT here"):
        check_repo_runtime(repo)
    # A tensorrt_plan repository without the record (made before it existed) is refused too.
    (repo / REPO_RECORD).unlink()
    with pytest.raises(EngineError, match=r"has no repo\.json saying which TensorRT built them; regenerate it"):
        check_repo_runtime(repo)


def test_served_gpu_must_be_the_plans_gpu(monkeypatch, tmp_path):
    kind = backend_for("tensorrt")
    RecordingTensorRT("10.5.0").install(monkeypatch)
    monkeypatch.setattr(type(kind), "device_name", lambda self, device_id=0: "NVIDIA L4")
    runtime = {"library": {"name": "tensorrt", "version": "10.5.0"}, "device": "NVIDIA H200"}
    with pytest.raises(EngineError) as err:
        kind.check_serving_runtime(runtime, tmp_path, "FIX")
    assert str(err.value) == (f"{tmp_path} holds plans built for GPU 'NVIDIA H200'; this machine's GPU 0 is "
                              f"'NVIDIA L4' (plans are tuned per GPU model). FIX")
    kind.check_serving_runtime({**runtime, "device": "NVIDIA L4"}, tmp_path, "FIX")


def test_ngc_tritonserver_without_pip_stubs_uses_its_own_stub(tmp_path):
    """deploy/Dockerfile's /opt/tritonserver has no python_backend_stubs/: its own stub is used as is."""
    from toonark.serving.launcher import install_python_stub
    stub = tmp_path / "backends" / "python" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"stub")
    assert install_python_stub(tmp_path) == stub
    stub.unlink()
    with pytest.raises(RuntimeError, match="the Triton bundle has no Python backend stub"):
        install_python_stub(tmp_path)


# --- skip reasons of the GPU tests ---------------------------------------------------------------

def test_tensorrt_test_runs_without_onnxruntime_cuda_and_skips_say_why():
    cpu_ort = ["CPUExecutionProvider"]
    # TensorRT and a CUDA torch present, onnxruntime without CUDA: the TensorRT test runs.
    assert gpu_skip_reason({"tensorrt"}, cpu_ort, None, True) is None
    assert gpu_skip_reason({"tensorrt"}, cpu_ort, "TensorRT is not installed (...)", True) == \
        "needs TensorRT: TensorRT is not installed (...)"
    assert gpu_skip_reason({"tensorrt"}, cpu_ort, None, False) == (
        "needs a CUDA GPU and a CUDA build of torch (TrtEngine's buffers are torch CUDA tensors): "
        "torch.cuda.is_available() is False")
    assert gpu_skip_reason({"gpu"}, cpu_ort, None, True) == \
        "needs a CUDA GPU with onnxruntime-gpu: onnxruntime here has ['CPUExecutionProvider']"
    assert gpu_skip_reason({"gpu"}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "no trt", False) is None
    from test_engines import test_tensorrt_engine_matches_onnx
    assert {m.name for m in test_tensorrt_engine_matches_onnx.pytestmark} == {"tensorrt"}
