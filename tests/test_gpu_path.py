"""The product's GPU path: fused ort-cuda fp16 builds, the device-resident loop (toonark.engines.ort_loop)
behind Text2ImagePipeline, CUDA-graph engines, and the Triton python layout on GPUs. What needs no GPU
runs here on the CPU (the loop runs on ort-cpu engines too); the CUDA checks are @pytest.mark.gpu."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from toonark.engines import build_engines, load_engine
from toonark.specs import BuildInfo
from toonark.layout import BuildLayout

from conftest import TEST_LIMITS


@pytest.fixture
def build_copy(tiny_engines, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(tiny_engines, out, ignore=shutil.ignore_patterns("ort-cpu-fp16", "ort-cpu-int8", "ort-cuda*",
                                                                    "triton_model_repo"))
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_default_fuse_and_source_for_ort_cuda_fp16(tiny_build):
    from toonark.engines.build import source_onnx
    from toonark.engines.ort import default_fuse
    assert default_fuse("ort-cuda", "fp16") and not default_fuse("ort-cuda", "fp32")
    assert not default_fuse("ort-cpu", "fp16")
    layout = BuildLayout(tiny_build)
    assert source_onnx(tiny_build, "ort-cuda", "fp16", "unet") == layout.onnx_model("fp32", "unet")
    assert source_onnx(tiny_build, "ort-cuda", "fp16", "unet", fused=False) == layout.onnx_model("fp16", "unet")
    assert source_onnx(tiny_build, "ort-cpu", "fp16", "unet") == layout.onnx_model("fp16", "unet")


def test_fuse_refused_outside_ort_fp16(tiny_build):
    with pytest.raises(ValueError, match="fuse applies"):
        build_engines(tiny_build, "ort-cpu", "fp32", fuse=True)


def test_fused_build_records_fusion_and_runs_on_cpu(build_copy):
    """The ort-cuda fp16 build path (fuse_for_cuda over the fp32 export, then fp16) on the CPU EP with
    the CPU-runnable fusions: engine.json records the op counts and the fp32 source; the engine loads,
    matches the fp32 export within fp16 error, and a rebuild is skipped as up to date."""
    results = build_engines(build_copy, "ort-cpu", "fp16", submodels=["unet"], fuse=True)
    meta = results["unet"]
    assert meta["status"] == "built"
    assert meta["fusion"]["nodes_after"] <= meta["fusion"]["nodes_before"]
    assert meta["fusion"]["fp16"] and set(meta["fusion"]["ops_after"])
    assert meta["source_onnx"].endswith("onnx/fp32/unet/model.onnx")
    assert meta["settings"]["fusion"]["cpu_safe"]
    engine = load_engine(build_copy, "ort-cpu", "fp16", "unet")
    feeds = engine.spec.sample_inputs(TEST_LIMITS.sizes("opt"))
    import onnxruntime as ort
    want = ort.InferenceSession(str(BuildLayout(build_copy).onnx_model("fp32", "unet")),
                                providers=["CPUExecutionProvider"]).run(["out_sample"], feeds)[0]
    assert _rel(engine.run(feeds)["out_sample"], want) < 2e-2
    again = build_engines(build_copy, "ort-cpu", "fp16", submodels=["unet"], fuse=True)
    assert again["unet"]["status"] == "up to date"


def test_device_loop_pipeline_equals_host_loop_on_cpu(tiny_engines):
    """Text2ImagePipeline with the device loop (step graph: CFG + DPM-Solver++ on the engines' device,
    here ort-cpu) gives the host loop's image: one scheduler, two loops."""
    from toonark.engines.pipeline import load_pipeline
    host = load_pipeline(tiny_engines, "ort-cpu", "fp32")
    assert host.device_loop is None
    loop = load_pipeline(tiny_engines, "ort-cpu", "fp32", device_loop=True)
    assert loop.device_loop is not None
    for kwargs in (dict(steps=6, guidance=7.5), dict(steps=3, guidance=1.0, batch=2)):
        a = host("a cartoon fox", seed=3, width=128, height=128, **kwargs)
        b = loop("a cartoon fox", seed=3, width=128, height=128, **kwargs)
        assert b.timings["device_loop"] and "denoise_ms" in b.timings
        assert _rel(b.decoded, a.decoded) < 1e-4
        assert np.abs(b.images.astype(int) - a.images.astype(int)).max() <= 1
    # a step callback (calibration capture) needs the host loop's per-step tensors: it falls back
    seen = []
    loop("a cartoon fox", seed=3, steps=2, width=128, height=128, step_callback=lambda *a: seen.append(a[0]))
    assert seen == [0, 1]


def test_device_loop_runs_v_prediction_like_the_host_loop(tiny_engines, tmp_path):
    """The step graph's coefficients come from the sampler for v_prediction too: the same build with a
    v_prediction scheduler gives the host loop's image on the device loop (ort-cpu here); a scheduler
    it cannot express (order 3) is refused with the way out."""
    import json
    from toonark.engines.ort_loop import check_scheduler
    from toonark.engines.pipeline import load_pipeline
    build = tmp_path / "build"
    shutil.copytree(tiny_engines, build, ignore=shutil.ignore_patterns("ort-cpu-fp16", "ort-cpu-int8", "ort-cuda*",
                                                                      "triton_model_repo", "calibration"))
    config_path = BuildLayout(build).pipeline / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    host = load_pipeline(build, "ort-cpu", "fp32")
    loop = load_pipeline(build, "ort-cpu", "fp32", device_loop=True)
    assert host.scheduler.config.prediction_type == "v_prediction"
    a = host("a cartoon fox", seed=3, steps=4, width=128, height=128)
    b = loop("a cartoon fox", seed=3, steps=4, width=128, height=128)
    assert b.timings["device_loop"]
    assert _rel(b.decoded, a.decoded) < 1e-4
    with pytest.raises(ValueError, match="host loop"):
        check_scheduler(SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon", solver_order=3)))


def test_python_layout_on_gpu_uses_kind_gpu_and_cuda_graphs(tiny_build):
    from toonark.serving.repository import repo_configs
    info = BuildInfo.read(tiny_build)
    configs = repo_configs(info, backend="ort-cuda", precision="fp16", layout="python")
    limits = info.limits
    sizes = f"B={limits.opt_batch},H={limits.opt_image},W={limits.opt_image}"
    assert "KIND_GPU" in configs["vae_decoder"] and sizes in configs["vae_decoder"]
    # the UNet runs inside the batching denoise step (unet_loop in_process), one CUDA graph per batch bucket
    assert "unet" not in configs
    assert "KIND_GPU" in configs["denoise"] and sizes in configs["denoise"]
    assert "KIND_GPU" in configs["text_encoder"] and "cuda_graph_sizes" not in configs["text_encoder"]
    cpu = repo_configs(info, backend="ort-cpu", precision="fp32", layout="python", unet_loop="bls")
    assert "KIND_CPU" in cpu["unet"] and "cuda_graph_sizes" not in cpu["unet"]


# --- GPU (skipped without CUDA) -----------------------------------------------------------

@pytest.mark.gpu
def test_ort_cuda_fp16_device_loop_with_cuda_graphs(build_copy):
    """Device loop + CUDA graphs on ort-cuda fp16. The tiny pipeline is built *without* the fusions: ORT's
    fused CUDA kernels refuse its sizes (BiasSplitGelu: hidden size 2560..12288 only; GroupNorm: not 8
    channels in 8 groups), seen on the H100; the fused SD-1.5 build runs in benchmarks/gpu_product.py."""
    from toonark.engines.pipeline import load_pipeline
    results = build_engines(build_copy, "ort-cuda", "fp16", fuse=False)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert "fusion" not in results[name] and results[name]["source_onnx"].endswith(f"onnx/fp16/{name}/model.onnx")
    size = TEST_LIMITS.opt_image
    host = load_pipeline(build_copy, "ort-cuda", "fp16", device_loop=False)
    ref = host("a cartoon fox", seed=3, steps=6, width=size, height=size)
    loop = load_pipeline(build_copy, "ort-cuda", "fp16")
    graph = load_pipeline(build_copy, "ort-cuda", "fp16", cuda_graph=True,
                                          graph_sizes={"B": 1, "H": size, "W": size})
    assert graph.engines["unet"].graph_values is not None and graph.engines["text_encoder"].graph_values is None
    for pipe in (loop, graph, graph):   # the graph pipeline twice: capture, then replay on the same buffers
        got = pipe("a cartoon fox", seed=3, steps=6, width=size, height=size)
        assert _rel(got.decoded, ref.decoded) < 2e-2
    # the graph engine's host path: same buffers, another size goes to the dynamic fallback session
    unet = graph.engines["unet"]
    feeds = unet.spec.sample_inputs(TEST_LIMITS.sizes("opt"))
    first = unet.run(feeds)["out_sample"]
    np.testing.assert_allclose(unet.run(feeds)["out_sample"], first, rtol=0, atol=0)
    bigger = unet.spec.sample_inputs(TEST_LIMITS.sizes("max"))
    assert unet.run(bigger)["out_sample"].shape == bigger["sample"].shape


@pytest.mark.gpu
def test_graph_engine_refuses_other_shapes_without_fallback(build_copy):
    build_engines(build_copy, "ort-cuda", "fp32", submodels=["vae_decoder"])
    engine = load_engine(build_copy, "ort-cuda", "fp32", "vae_decoder", cuda_graph=True,
                         graph_sizes=TEST_LIMITS.sizes("opt"), fallback=False)
    with pytest.raises(ValueError, match="captured"):
        engine.run(engine.spec.sample_inputs(TEST_LIMITS.sizes("max")))


@pytest.mark.gpu
def test_served_denoise_loops_on_cuda(build_copy):
    """What the served `denoise` runs on ort-cuda (issue 12), without Triton: runtime.UnetLoops (one CUDA-graph
    session per batch bucket, then replays) for one request and for two batched by run_batch, and BlsDeviceLoop
    with the UNet's inputs and output crossing as CUDA DLPack tensors; all against the host loop."""
    from toonark.engines.dlpack import OrtValueView
    from toonark.engines.metadata import read_metadata
    from toonark.triton_model_repo.runtime import BlsDeviceLoop, DenoiseRequest, Denoiser, UnetLoops
    build_engines(build_copy, "ort-cuda", "fp16", fuse=False)
    info = BuildInfo.read(build_copy)
    layout = BuildLayout(build_copy)
    denoiser = Denoiser(layout.pipeline, info)
    size = TEST_LIMITS.opt_image
    unet_dir = layout.engine_dir("ort-cuda", "fp16") / "unet"
    loops = UnetLoops(unet_dir / "model.onnx", info.specs["unet"], read_metadata(build_copy, "ort-cuda", "fp16", "unet"),
                      info.dims, denoiser.family, graph_sizes=[{"B": b, "H": size, "W": size} for b in (1, 2)])
    host_unet = load_engine(build_copy, "ort-cuda", "fp16", "unet")
    rng = np.random.default_rng(0)
    texts = [rng.standard_normal((2, info.dims.text_length, info.dims.text_hidden)).astype(np.float32)
             for _ in range(2)]
    items = [DenoiseRequest(t, [seed], 4, 7.5, size, size) for t, seed in zip(texts, (3, 4))]
    host = [denoiser.run(i.text_embeddings, unet=lambda f: host_unet.run(f)["out_sample"], **i.options()) for i in items]
    for _ in range(2):   # capture, then replay
        one = denoiser.run_loop(items[0].text_embeddings, loop=loops.loop_for(1, size, size), **items[0].options())
        assert _rel(one, host[0]) < 2e-2
    for got, want in zip(denoiser.run_batch(items, loops.loop_for, loops.buckets), host):
        assert not isinstance(got, Exception) and _rel(got, want) < 2e-2

    def unet_dlpack(feeds):   # as the Triton model: device buffers in by DLPack, the output back the same way
        values = {name: v.value if isinstance(v, OrtValueView) else v for name, v in feeds.items()}
        assert all(v.device_name().lower().startswith("cuda") for v in values.values() if not isinstance(v, np.ndarray))
        return OrtValueView(host_unet.run_device(values)["out_sample"])
    bls = BlsDeviceLoop(unet_dlpack, info.dims, denoiser.family, on_cuda=True)
    got = denoiser.run_loop(items[1].text_embeddings, loop=bls, **items[1].options())
    assert _rel(got, host[1]) < 2e-2
