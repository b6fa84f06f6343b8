"""Engine stage: ORT CPU engines built from the tiny export, engine.json checks, int8 gates,
TensorRT build plans and the trtexec / polygraphy command lines."""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from toonark.engines import build_engines, load_engine
from toonark.engines.backends import cpu_family
from toonark.engines.commands import build_dir_commands, polygraphy_compare, trtexec_benchmark, trtexec_build
from toonark.engines.metadata import EngineError
from toonark.engines.tensorrt import trt_build_plan
from toonark.specs import SERVED_SUBMODELS, BuildInfo, PipelineDims, submodel_specs
from toonark.files import sha256_file, sha256_onnx, write_json
from toonark.layout import BuildLayout

from conftest import TEST_LIMITS

TINY_DIMS = PipelineDims(text_length=77, text_hidden=32, latent_channels=4, vae_scale=8, vae_scaling_factor=0.18215)
ALL_SUBMODELS = SERVED_SUBMODELS + ("vae_encoder",)


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture
def build_copy(tiny_engines, tmp_path) -> Path:
    """A private copy of the built folder for tests that corrupt or add files."""
    out = tmp_path / "build"
    shutil.copytree(tiny_engines, out, ignore=shutil.ignore_patterns("ort-cpu-fp16", "ort-cpu-int8"))
    return out


def _reference(onnx_path: Path, names, feeds):
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(names, feeds)


# --- ORT CPU engines ----------------------------------------------------------------------

@pytest.mark.parametrize("submodel", ALL_SUBMODELS)
def test_ort_cpu_fp32_engine_matches_source_onnx(tiny_engines, submodel):
    engine = load_engine(tiny_engines, "ort-cpu", "fp32", submodel, threads=1)
    layout = BuildLayout(tiny_engines)
    for level in ("min", "max"):
        feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes(level), seed=3)
        got = engine.run(feeds)
        want = _reference(layout.onnx_model("fp32", submodel), engine.spec.output_names, feeds)
        for name, expected in zip(engine.spec.output_names, want):
            assert got[name].shape == expected.shape
            assert got[name].dtype == np.float32
            assert float(np.abs(got[name] - expected).max()) <= 1e-5


def test_ort_cpu_fp16_engine_runs_and_matches_source(tiny_build):
    results = build_engines(tiny_build, backend="ort-cpu", precision="fp16", submodels=["unet", "vae_decoder"])
    assert set(results) == {"unet", "vae_decoder"}
    layout = BuildLayout(tiny_build)
    for submodel in results:
        engine = load_engine(tiny_build, "ort-cpu", "fp16", submodel, threads=1)
        feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes("opt"), seed=4)
        got = engine.run(feeds)
        want = _reference(layout.onnx_model("fp16", submodel), engine.spec.output_names, feeds)
        for name, expected in zip(engine.spec.output_names, want):
            assert float(np.abs(got[name].astype(np.float32) - expected.astype(np.float32)).max()) <= 1e-3


def test_default_build_has_served_submodels_and_exported_vae_encoder(tiny_engines):
    root = BuildLayout(tiny_engines).engine_dir("ort-cpu", "fp32")
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(ALL_SUBMODELS)
    for submodel in ALL_SUBMODELS:
        assert {p.name for p in (root / submodel).iterdir()} >= {"model.onnx", "engine.json"}


def test_engine_json_records_source_settings_and_versions(tiny_engines):
    layout = BuildLayout(tiny_engines)
    folder = layout.engine_dir("ort-cpu", "fp32") / "unet"
    meta = json.loads((folder / "engine.json").read_text())
    assert meta["backend"] == "ort-cpu" and meta["precision"] == "fp32" and meta["submodel"] == "unet"
    assert meta["source_onnx"] == "onnx/fp32/unet/model.onnx"
    assert meta["source_onnx_sha256"] == sha256_onnx(layout.onnx_model("fp32", "unet"))
    assert meta["engine_sha256"] == sha256_onnx(folder / "model.onnx")
    assert meta["profile"]["sample"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}
    assert meta["profile"]["timestep"] == {"min": [1], "opt": [1], "max": [1]}
    assert meta["limits"] == TEST_LIMITS.to_json()
    assert meta["library"] == {"name": "onnxruntime", "version": ort.__version__}
    assert meta["device"] == cpu_family() and meta["device"].startswith(f"cpu {platform.machine()}")
    assert meta["io"]["inputs"]["timestep"] == {"dtype": "float32", "shape": [1]}
    assert meta["settings"]["providers"] == [["CPUExecutionProvider", {}]]
    assert meta["settings"]["load_optimization_level"] == "disable_all"
    for key in ("toonark_version", "created", "build_seconds", "engine_bytes"):
        assert key in meta


def test_rebuild_is_skipped_when_up_to_date_and_forced_otherwise(build_copy, caplog):
    plan = BuildLayout(build_copy).engine_dir("ort-cpu", "fp32") / "unet" / "model.onnx"
    before = plan.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="toonark.engines.build"):
        results = build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"])
    out = caplog.text
    assert results["unet"]["status"] == "up to date"
    assert f"ort-cpu-fp32/unet: up to date ({plan.parent})" in out
    assert plan.stat().st_mtime_ns == before
    assert build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"], force=True)["unet"]["status"] == "built"
    # Other settings are another engine: rebuilt without --force.
    assert build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"], threads=1)["unet"]["status"] == "built"


def test_source_onnx_is_hashed_once_per_build(build_copy, monkeypatch):
    import toonark.engines.build as build_module
    import toonark.engines.metadata as metadata_module
    source = BuildLayout(build_copy).onnx_model("fp32", "unet")
    hashed = []

    def counting(path):
        hashed.append(Path(path))
        return sha256_onnx(path)
    monkeypatch.setattr(build_module, "sha256_onnx", counting)
    monkeypatch.setattr(metadata_module, "sha256_onnx", counting)
    assert build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"])["unet"]["status"] == "up to date"
    assert hashed.count(source) == 1
    hashed.clear()
    # Changed settings: rebuilt; the source is hashed once, for both the check and engine.json.
    result = build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"], threads=1)["unet"]
    assert result["status"] == "built"
    assert result["source_onnx_sha256"] == sha256_onnx(source)
    assert hashed.count(source) == 1


def test_feeds_are_checked(tiny_engines):
    engine = load_engine(tiny_engines, "ort-cpu", "fp32", "unet", threads=1)
    feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes("opt"))
    half = {**feeds, "sample": feeds["sample"].astype(np.float16)}   # float inputs are cast to the engine's type
    assert engine.run(half)["out_sample"].shape == (2, 4, 16, 16)
    with pytest.raises(ValueError) as err:
        engine.run({**feeds, "sample": np.zeros((2, 4, 48, 48), np.float32)})
    assert str(err.value) == ("unet input 'sample' has shape [2, 4, 48, 48], outside the engine profile "
                              "[2, 4, 8, 8]..[4, 4, 32, 32]; re-export with wider limits (`scripts/export.py "
                              "--max-batch/--min-image/--max-image`), then `make engine`")
    with pytest.raises(ValueError) as err:
        engine.run({k: v for k, v in feeds.items() if k != "timestep"})
    assert str(err.value) == ("unet engine takes inputs ['sample', 'timestep', 'encoder_hidden_states']; got "
                              "['encoder_hidden_states', 'sample'] (missing ['timestep'], unknown [])")


# --- refusals -----------------------------------------------------------------------------

def test_load_refuses_corrupt_engine(build_copy):
    folder = BuildLayout(build_copy).engine_dir("ort-cpu", "fp32") / "vae_decoder"
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    recorded = json.loads((folder / "engine.json").read_text())["engine_sha256"]
    actual = sha256_onnx(folder / "model.onnx")
    with pytest.raises(EngineError) as err:
        load_engine(build_copy, "ort-cpu", "fp32", "vae_decoder")
    assert str(err.value) == (f"{folder / 'model.onnx'} is corrupt: sha256 {actual[:12]} differs from "
                              f"{recorded[:12]} recorded in {folder / 'engine.json'}. Rebuild it with "
                              f"`make engine OUT={build_copy} BACKEND=ort-cpu PRECISION=fp32`.")


def test_load_refuses_stale_engine_and_rebuild_fixes_it(build_copy):
    layout = BuildLayout(build_copy)
    source = layout.onnx_model("fp32", "vae_decoder")
    old = sha256_onnx(source)
    model = onnx.load(str(source))
    model.doc_string = "re-exported"
    onnx.save(model, str(source))
    new = sha256_onnx(source)
    folder = layout.engine_dir("ort-cpu", "fp32") / "vae_decoder"
    with pytest.raises(EngineError) as err:
        load_engine(build_copy, "ort-cpu", "fp32", "vae_decoder")
    assert str(err.value) == (f"{folder} is stale: it was built from {source} with sha256 {old[:12]}, which is now "
                              f"{new[:12]}. Rebuild it with `make engine OUT={build_copy} BACKEND=ort-cpu PRECISION=fp32`.")
    assert build_engines(build_copy, "ort-cpu", "fp32", submodels=["vae_decoder"])["vae_decoder"]["status"] == "built"
    load_engine(build_copy, "ort-cpu", "fp32", "vae_decoder")


def test_load_refuses_a_cpu_engine_laid_out_for_another_cpu_family_and_rebuild_fixes_it(build_copy):
    """A CPU engine is saved at ORT level "all", with NCHWc layouts sized for the CPU that built it (the UNet here
    has them): an AVX2-built tiny UNet died with SIGFPE on an AVX-512 host. An engine.json naming another family
    (or the bare "cpu" of engines built before 2026-12-04) is refused by name; `make engine` rebuilds it here."""
    folder = BuildLayout(build_copy).engine_dir("ort-cpu", "fp32") / "unet"
    assert any(node.domain == "com.microsoft.nchwc" for node in onnx.load(folder / "model.onnx").graph.node)
    meta = json.loads((folder / "engine.json").read_text())
    other = "cpu x86_64" if cpu_family().endswith("+avx512f") else "cpu x86_64+avx512f"
    write_json(folder / "engine.json", {**meta, "device": other})
    with pytest.raises(EngineError) as err:
        load_engine(build_copy, "ort-cpu", "fp32", "unet")
    assert str(err.value) == (f"{folder / 'model.onnx'} was laid out by ONNX Runtime for CPU {other!r}; this machine "
                              f"is {cpu_family()!r}, where that layout fails (an AVX2 build dies with SIGFPE on "
                              f"AVX-512). Rebuild it with `make engine OUT={build_copy} BACKEND=ort-cpu PRECISION=fp32`.")
    assert build_engines(build_copy, "ort-cpu", "fp32", submodels=["unet"])["unet"]["status"] == "built"
    assert json.loads((folder / "engine.json").read_text())["device"] == cpu_family()
    load_engine(build_copy, "ort-cpu", "fp32", "unet")


def test_load_refuses_missing_metadata_and_missing_engine(build_copy):
    folder = BuildLayout(build_copy).engine_dir("ort-cpu", "fp32") / "text_encoder"
    (folder / "engine.json").unlink()
    fix = f"Build it with `make engine OUT={build_copy} BACKEND=ort-cpu PRECISION=fp32`."
    with pytest.raises(EngineError) as err:
        load_engine(build_copy, "ort-cpu", "fp32", "text_encoder")
    assert str(err.value) == f"text_encoder engine metadata not found: {folder / 'engine.json'}. {fix}"
    shutil.rmtree(folder)
    with pytest.raises(EngineError) as err:
        load_engine(build_copy, "ort-cpu", "fp32", "text_encoder")
    assert str(err.value) == f"no ort-cpu fp32 engine for text_encoder: {folder / 'model.onnx'} is missing. {fix}"


# --- int8 ---------------------------------------------------------------------------------

def _calibrate(build_dir: Path, passed=True, source_sha=None) -> Path:
    """Stand-in for `make calibrate`: the fp32 UNet as "QDQ" model plus a report."""
    layout = BuildLayout(build_dir)
    layout.int8_unet.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(layout.onnx_model("fp32", "unet"), layout.int8_unet)
    report = layout.calibration / "report.json"
    write_json(report, {"passed": passed,
                        "source_onnx_sha256": source_sha or sha256_onnx(layout.onnx_model("fp32", "unet")),
                        "int8_onnx_sha256": sha256_onnx(layout.int8_unet),
                        "metrics": {"rel_l2": 0.31, "cosine": 0.95}, "thresholds": {"rel_l2": 0.1, "cosine": 0.99},
                        "advice": "raise --percentile to 99.999 or exclude more convs (--exclude)"})
    return report


def test_int8_refuses_without_calibration(build_copy):
    with pytest.raises(EngineError) as err:
        build_engines(build_copy, "ort-cpu", "int8")
    assert str(err.value) == (f"no INT8 UNet: {BuildLayout(build_copy).int8_unet} is missing; "
                              f"run `make calibrate OUT={build_copy}` first")


def test_int8_refuses_failed_gate(build_copy):
    report = _calibrate(build_copy, passed=False)
    with pytest.raises(EngineError) as err:
        build_engines(build_copy, "ort-cpu", "int8")
    assert str(err.value) == (f"INT8 calibration failed its quality gate ({report}): cosine 0.95 vs threshold 0.99, "
                              f"rel_l2 0.31 vs threshold 0.1. Advice: raise --percentile to 99.999 or exclude more "
                              f"convs (--exclude). Adjust it and run `make calibrate OUT={build_copy}` again, "
                              f"or build PRECISION=fp16.")
    data = json.loads(report.read_text())
    write_json(report, {**data, "failing": ["psnr_db 17.2 < 25"]})
    with pytest.raises(EngineError, match=r"quality gate \(.*report\.json\): psnr_db 17\.2 < 25\. Advice: raise"):
        build_engines(build_copy, "ort-cpu", "int8")


def test_int8_refuses_a_model_the_gate_did_not_score(build_copy):
    _calibrate(build_copy)
    layout = BuildLayout(build_copy)
    shutil.copy(layout.onnx_model("fp16", "unet"), layout.int8_unet)   # e.g. a re-calibration that died mid-way
    on_disk, scored = sha256_onnx(layout.int8_unet), sha256_onnx(layout.onnx_model("fp32", "unet"))
    with pytest.raises(EngineError) as err:
        build_engines(build_copy, "ort-cpu", "int8")
    assert str(err.value) == (f"INT8 UNet {layout.int8_unet} (sha256 {on_disk[:12]}) is not the model the quality "
                              f"gate scored ({scored[:12]}); run `make calibrate OUT={build_copy}` again")


def test_int8_refuses_stale_calibration(build_copy):
    report = _calibrate(build_copy, source_sha="0" * 64)
    layout = BuildLayout(build_copy)
    fp32 = sha256_onnx(layout.onnx_model("fp32", "unet"))
    with pytest.raises(EngineError) as err:
        build_engines(build_copy, "ort-cpu", "int8")
    assert str(err.value) == (f"INT8 calibration is stale: {report} was made from UNet ONNX sha256 000000000000, "
                              f"the current export has onnx/fp32/unet {fp32[:12]}; "
                              f"run `make calibrate OUT={build_copy}` again")
    # Calibration quantizes the fp32 UNet: a report made from the fp16 UNet is stale as well.
    _calibrate(build_copy, source_sha=sha256_onnx(layout.onnx_model("fp16", "unet")))
    with pytest.raises(EngineError, match="INT8 calibration is stale"):
        build_engines(build_copy, "ort-cpu", "int8")


def test_int8_builds_unet_from_calibrated_model(build_copy):
    _calibrate(build_copy)
    results = build_engines(build_copy, "ort-cpu", "int8", submodels=["unet", "text_encoder"])
    assert results["unet"]["source_onnx"] == "calibration/int8/unet/model.onnx"
    assert results["text_encoder"]["source_onnx"] == "onnx/fp32/text_encoder/model.onnx"
    engine = load_engine(build_copy, "ort-cpu", "int8", "unet", threads=1)
    assert engine.run(engine.spec.sample_inputs(TEST_LIMITS.sizes("min")))["out_sample"].shape == (2, 4, 8, 8)


# --- TensorRT -----------------------------------------------------------------------------

UNET_PROFILE = (("sample", (2, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)),
                ("timestep", (1,), (1,), (1,)),
                ("encoder_hidden_states", (2, 77, 32), (2, 77, 32), (4, 77, 32)))


def test_trt_build_plan_fp16_and_int8():
    unet = submodel_specs(TINY_DIMS)["unet"]
    fp16 = trt_build_plan(unet, TEST_LIMITS, "fp16", {"timing_cache": "/b/engines/timing.cache"})
    assert fp16.builder_flags == ("FP16",) and fp16.network_flags == ()
    assert fp16.profile == UNET_PROFILE
    assert (fp16.workspace_bytes, fp16.optimization_level, fp16.timing_cache, fp16.refit) == \
        (8 << 30, 3, "/b/engines/timing.cache", False)
    int8 = trt_build_plan(unet, TEST_LIMITS, "int8", {"refit": True, "workspace_bytes": 1 << 30})
    assert int8.builder_flags == ("INT8", "FP16", "REFIT") and int8.profile == UNET_PROFILE
    assert int8.workspace_bytes == 1 << 30 and int8.timing_cache is None
    typed = trt_build_plan(unet, TEST_LIMITS, "int8", {"strongly_typed": True})
    assert typed.builder_flags == () and typed.network_flags == ("STRONGLY_TYPED",)
    assert trt_build_plan(unet, TEST_LIMITS, "fp32").builder_flags == ()
    assert trt_build_plan(unet, TEST_LIMITS, "fp16").to_json()["profile"]["sample"] == \
        {"min": [2, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}
    with pytest.raises(ValueError, match=r"^TensorRT builder optimization level must be 0\.\.5, got 7$"):
        trt_build_plan(unet, TEST_LIMITS, "fp16", {"optimization_level": 7})


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tiny_build):
    if _tensorrt_importable():
        pytest.skip("tensorrt is installed here")
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        reason = str(err)
    with pytest.raises(RuntimeError) as err:
        build_engines(tiny_build, backend="tensorrt", precision="fp16")
    assert str(err.value) == (f"TensorRT is not installed (import tensorrt failed: {reason}). Install the TensorRT "
                              f"Python wheel for your CUDA on a GPU machine, or build BACKEND=ort-cuda / ort-cpu.")


def test_ort_cuda_without_cuda_is_a_clear_error(tiny_build):
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        pytest.skip("CUDA EP available")
    with pytest.raises(RuntimeError) as err:
        build_engines(tiny_build, backend="ort-cuda", precision="fp16")
    assert str(err.value) == (f"onnxruntime-gpu with CUDA is needed for BACKEND=ort-cuda; this machine has providers "
                              f"{providers}. Install onnxruntime-gpu on a CUDA machine, or build BACKEND=ort-cpu.")


# --- command lines ------------------------------------------------------------------------

def test_trtexec_and_polygraphy_lines_for_tiny_unet():
    unet = submodel_specs(TINY_DIMS)["unet"]
    onnx_path, plan_path = Path("/b/onnx/fp16/unet/model.onnx"), Path("/b/p/unet.plan")
    fp16 = trt_build_plan(unet, TEST_LIMITS, "fp16", {"timing_cache": "/b/t.cache"})
    # A bare workspace number: MiB in every TensorRT 10 trtexec ("8192M" is 2^20 times too large on 10.0.x).
    assert trtexec_build(onnx_path, plan_path, unet, fp16) == [
        "trtexec", "--onnx=/b/onnx/fp16/unet/model.onnx", "--saveEngine=/b/p/unet.plan",
        "--minShapes=sample:2x4x8x8,encoder_hidden_states:2x77x32",
        "--optShapes=sample:2x4x16x16,encoder_hidden_states:2x77x32",
        "--maxShapes=sample:4x4x32x32,encoder_hidden_states:4x77x32",
        "--fp16", "--memPoolSize=workspace:8192", "--builderOptimizationLevel=3", "--timingCacheFile=/b/t.cache"]
    int8 = trt_build_plan(unet, TEST_LIMITS, "int8", {"workspace_bytes": 3 << 29})
    assert trtexec_build(onnx_path, plan_path, unet, int8)[6:] == [
        "--int8", "--fp16", "--memPoolSize=workspace:1536", "--builderOptimizationLevel=3"]
    assert trtexec_benchmark(plan_path, unet, fp16) == [
        "trtexec", "--loadEngine=/b/p/unet.plan", "--shapes=sample:2x4x16x16,encoder_hidden_states:2x77x32",
        "--useCudaGraph", "--noDataTransfers", "--useSpinWait"]
    assert polygraphy_compare(onnx_path, unet, fp16) == [
        "polygraphy", "run", "/b/onnx/fp16/unet/model.onnx", "--trt", "--onnxrt", "--fp16",
        "--trt-min-shapes", "sample:[2,4,8,8]", "encoder_hidden_states:[2,77,32]",
        "--trt-opt-shapes", "sample:[2,4,16,16]", "encoder_hidden_states:[2,77,32]",
        "--trt-max-shapes", "sample:[4,4,32,32]", "encoder_hidden_states:[4,77,32]",
        "--input-shapes", "sample:[2,4,16,16]", "encoder_hidden_states:[2,77,32]",
        "--atol", "0.02", "--rtol", "0.02"]


def test_printed_lines_follow_strongly_typed_and_refit():
    """The lines come from the TrtBuildPlan `make engine` builds: a strongly typed plan has no precision flags
    (the ONNX types decide), a refittable one says so, to trtexec and to polygraphy alike."""
    unet = submodel_specs(TINY_DIMS)["unet"]
    onnx_path, plan_path = Path("/b/onnx/fp16/unet/model.onnx"), Path("/b/p/unet.plan")
    typed = trt_build_plan(unet, TEST_LIMITS, "fp16", {"strongly_typed": True, "refit": True})
    assert trtexec_build(onnx_path, plan_path, unet, typed)[6:8] == ["--stronglyTyped", "--refit"]
    assert polygraphy_compare(onnx_path, unet, typed)[5:7] == ["--strongly-typed", "--refittable"]
    refit = trt_build_plan(unet, TEST_LIMITS, "fp16", {"refit": True})
    assert trtexec_build(onnx_path, plan_path, unet, refit)[6:8] == ["--fp16", "--refit"]
    assert polygraphy_compare(onnx_path, unet, refit)[5:7] == ["--fp16", "--refittable"]
    for line in (trtexec_build(onnx_path, plan_path, unet, typed), polygraphy_compare(onnx_path, unet, typed)):
        assert not {"--fp16", "--int8"} & set(line)


def test_build_dir_commands_cover_exported_submodels(tiny_build):
    sets = build_dir_commands(tiny_build, precisions=("fp32", "fp16", "int8"))
    # No calibrated UNet in the shared build: no int8 lines.
    assert [(c.submodel, c.precision) for c in sets] == [(n, p) for p in ("fp32", "fp16") for n in ALL_SUBMODELS]
    vae = next(c for c in sets if (c.submodel, c.precision) == ("vae_decoder", "fp32"))
    assert vae.build[3] == "--minShapes=latent_sample:1x4x8x8"
    assert vae.build[-1] == f"--timingCacheFile={BuildLayout(tiny_build).timing_cache}"


# --- CLIs ---------------------------------------------------------------------------------

def test_build_engine_cli(build_copy, tmp_path, capsys):
    from toonark.scripts.build_engine import main
    assert main(["--out", str(build_copy), "--backend", "ort-cpu", "--precision", "fp32",
                 "--submodel", "vae_decoder"]) == 0
    out = capsys.readouterr().out
    assert "vae_decoder" in out and "up to date" in out and "model.onnx" in out
    assert main(["--out", str(tmp_path / "nothing"), "--backend", "ort-cpu", "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: build info not found: ") and err.count("\n") == 1
    assert main(["--out", str(build_copy), "--backend", "ort-cpu", "--precision", "fp32",
                 "--submodel", "nope"]) == 1
    assert capsys.readouterr().err == ("error: unknown submodel 'nope'; choose from text_encoder, unet, "
                                       "vae_decoder, vae_encoder\n")
    if not _tensorrt_importable():
        assert main(["--out", str(build_copy), "--backend", "tensorrt", "--precision", "fp16"]) == 1
        assert capsys.readouterr().err.startswith("error: TensorRT is not installed")


def test_trtexec_cli(tiny_build, tmp_path, capsys):
    from toonark.scripts.trtexec import main
    assert main(["--out", str(tiny_build), "--precision", "fp16", "--submodel", "unet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mkdir -p ")
    assert lines[2] == "# unet fp16: build, benchmark at opt, compare with ONNX Runtime"
    assert lines[3].startswith(f"trtexec --onnx={BuildLayout(tiny_build).onnx_model('fp16', 'unet')} ")
    assert "--refit" not in lines[3] and "--stronglyTyped" not in lines[3]
    assert lines[5].startswith("polygraphy run ")
    # make engine's TensorRT flags (TRT_FLAGS) give the lines of that plan.
    assert main(["--out", str(tiny_build), "--precision", "fp16", "--submodel", "unet", "--refit", "--strongly-typed",
                 "--workspace-mib", "2048"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " --stronglyTyped --refit --memPoolSize=workspace:2048 " in lines[3] and " --fp16" not in lines[3]
    assert " --strongly-typed --refittable " in lines[5]
    assert main(["--out", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.startswith("error: build info not found: ")


# --- GPU (skipped without CUDA) -----------------------------------------------------------

@pytest.mark.gpu
def test_ort_cuda_engine_matches_cpu_and_binds_device_memory(build_copy):
    import torch
    build_engines(build_copy, "ort-cuda", "fp32", submodels=["unet"])
    engine = load_engine(build_copy, "ort-cuda", "fp32", "unet")
    meta = engine.metadata
    assert meta["settings"]["providers"][0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert meta["device"] != "cpu"
    feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes("opt"))
    want = _reference(BuildLayout(build_copy).onnx_model("fp32", "unet"), ["out_sample"], feeds)[0]
    # fp32 on the CUDA EP uses TF32 convolutions / matmuls (ORT's use_tf32 default): 1.2e-3 seen on the H100
    tol = 3e-3
    assert float(np.abs(engine.run(feeds)["out_sample"] - want).max()) <= tol
    device = engine.run_torch({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})
    assert float(np.abs(device["out_sample"].cpu().numpy() - want).max()) <= tol
    values = engine.run_device(feeds)
    assert values["out_sample"].device_name() == "cuda"
    graph = load_engine(build_copy, "ort-cuda", "fp32", "unet", cuda_graph=True, graph_sizes=TEST_LIMITS.sizes("opt"))
    for _ in range(2):  # the first run captures, the second replays
        assert float(np.abs(graph.run(feeds)["out_sample"] - want).max()) <= tol


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnx(build_copy, caplog):
    """Needs TensorRT and a CUDA torch, not onnxruntime-gpu (the reference runs on ORT's CPU EP)."""
    import logging
    build_engines(build_copy, "tensorrt", "fp16", submodels=["unet"])
    assert BuildLayout(build_copy).timing_cache.is_file()
    # The cache this GPU just wrote is accepted by the next build (set_timing_cache says True: no warning).
    with caplog.at_level(logging.WARNING, logger="toonark.engines.tensorrt"):
        build_engines(build_copy, "tensorrt", "fp16", submodels=["unet"], force=True)
    assert "timing cache" not in caplog.text
    engine = load_engine(build_copy, "tensorrt", "fp16", "unet")
    feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes("opt"))
    want = _reference(BuildLayout(build_copy).onnx_model("fp32", "unet"), ["out_sample"], feeds)[0]
    got = engine.run(feeds)["out_sample"]
    assert float(np.abs(got - want).max()) / float(np.abs(want).max()) <= 2e-2
