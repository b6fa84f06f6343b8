"""How `denoise` runs the UNet (issue 12): in_process (it owns the engine: the device loop with CUDA graphs per
bucket on ort-cuda, the host loop on ort-cpu) or bls_device (BLS to `unet` with DLPack tensors and the solver
step in ONNX Runtime), next to the default bls. The DLPack bridge and the step graph are checked without Triton;
each loop is then served for real by the bundled tritonserver and compared with the offline pipeline."""
from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import TEST_LIMITS
from toonark import api
from toonark.specs import BuildInfo, PipelineDims

SUBJECT = "a happy otter with a kite"
SD_INFO = BuildInfo(PipelineDims(text_length=77, text_hidden=768, latent_channels=4, vae_scale=8,
                                 vae_scaling_factor=0.18215), TEST_LIMITS)


def test_ortvalue_view_is_zero_copy_dlpack_and_borrow_reads_capsules():
    import onnxruntime as ort
    from toonark.engines.dlpack import OrtValueView, borrow
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    value = ort.OrtValue.ortvalue_from_numpy(array)   # a CPU OrtValue aliases the array
    seen = np.from_dlpack(OrtValueView(value))
    assert seen.shape == (2, 3, 4) and seen.dtype == np.float32
    array[1, 2, 3] = -7.0
    assert seen[1, 2, 3] == -7.0   # same memory, no copy
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    ref = borrow(ints)
    assert (ref.pointer, ref.shape, ref.dtype, ref.device) == (ints.ctypes.data, (2, 3), np.dtype(np.int64), "cpu")
    with pytest.raises(ValueError, match="not C-contiguous"):
        borrow(np.zeros((4, 4), np.float32)[:, ::2])


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 0.0), (np.float16, 2e-3)])
def test_step_graph_with_fp16_unet_io_matches_the_fp32_graph(dtype, tolerance):
    """The step graph for a UNet with fp16 I/O (a TensorRT plan) reads and writes fp16 through casts; its solver
    state stays float32."""
    from toonark.engines.ort_loop import step_session
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x, m = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    coef = np.array([7.5, 1.1, 0.3, 0.9, 0.2, -0.1], np.float32)
    reference = step_session(False).run(None, {"noise_pred": noise, "x": x, "m_prev": m, "coef": coef})
    got = step_session(False, unet_dtype=dtype).run(None, {"noise_pred": noise.astype(dtype), "x": x, "m_prev": m,
                                                           "coef": coef})
    assert got[2].dtype == dtype and got[0].dtype == np.float32
    for a, b in zip(reference, got):
        assert np.abs(a - b.astype(np.float32)).max() <= tolerance * max(1.0, np.abs(a).max())


def test_call_with_retry_retries_unavailable_a_bounded_number_of_times():
    from toonark.triton_model_repo.runtime import call_with_retry
    answers, slept = iter(["busy", "busy", "ok"]), []
    assert call_with_retry(lambda: next(answers), lambda r: r == "busy", attempts=3, delay_s=0.01,
                           sleep=slept.append) == "ok"
    assert slept == [0.01, 0.02]
    calls = []
    assert call_with_retry(lambda: calls.append(1) or "busy", lambda r: r == "busy", attempts=3,
                           sleep=lambda s: None) == "busy"
    assert len(calls) == 3   # bounded: the last answer is passed on


def test_generator_picks_the_unet_loop_per_backend_and_layout():
    from toonark.serving.repository import repo_configs
    gpu = repo_configs(SD_INFO, backend="ort-cuda", precision="fp16")
    assert "unet" not in gpu   # denoise owns it
    # request batching: denoise itself has Triton's dynamic batcher and stays an ensemble step (no BLS front)
    assert set(gpu) == {"toonark", "preprocess", "text_encoder", "denoise", "vae_decoder", "postprocess"}
    loop = gpu["denoise"]
    assert '"unet_loop" value: { string_value: "in_process" }' in loop and "kind: KIND_GPU count: 1" in loop
    assert "max_batch_size: 2" in loop and loop.count("dynamic_batching") == 1
    assert ("dynamic_batching { max_queue_delay_microseconds: 3000 default_queue_policy { timeout_action: REJECT "
            "default_timeout_microseconds: 0 max_queue_size: 16 } }") in loop
    assert '"cuda_graph_sizes" value: { string_value: "B=1,H=128,W=128;B=2,H=128,W=128" }' in loop
    assert 'model_name: "denoise" model_version: -1 input_map { key: "last_hidden_state" value: "text_embeddings" }' \
        in gpu["toonark"]
    single = repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", batch_requests=False, denoise_instances=2)
    assert "max_batch_size: 0" in single["denoise"] and "kind: KIND_GPU count: 2" in single["denoise"]
    assert '"unet_loop" value: { string_value: "in_process" }' in single["denoise"]
    native = repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", layout="onnxruntime_onnx")
    assert '"unet_loop" value: { string_value: "bls_device" }' in native["denoise"]
    assert '"unet_device" value: { string_value: "cuda" }' in native["denoise"] and "unet" in native
    # the CPU default: denoise owns the UNet too (no BLS callee in the default repository, issue 18)
    cpu = repo_configs(SD_INFO)
    assert '"unet_loop" value: { string_value: "in_process" }' in cpu["denoise"] and "unet" not in cpu
    assert set(cpu) == {"toonark", "preprocess", "text_encoder", "denoise", "vae_decoder", "postprocess"}
    native_cpu = repo_configs(SD_INFO, layout="onnxruntime_onnx")
    assert '"unet_loop" value: { string_value: "bls" }' in native_cpu["denoise"] and "unet" in native_cpu
    with pytest.raises(ValueError, match="unet_loop in_process runs the UNet engine inside denoise"):
        repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", layout="onnxruntime_onnx", unet_loop="in_process")
    with pytest.raises(ValueError, match="batch_requests groups requests in the device loop denoise owns"):
        repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", unet_loop="bls", batch_requests=True)
    with pytest.raises(ValueError, match="unknown unet_loop 'gpu'"):
        repo_configs(SD_INFO, unet_loop="gpu")


def test_generator_serves_loras_and_other_families_over_bls():
    """The device loop is plain SD text-to-image: a LoRA repository on a GPU (styles switched in the unet model's
    runner on host tensors) and a family without ModelFamily.device_loop (Qwen-Image) default to bls, and refuse the
    others; on ort-cpu an in_process denoise switches the styles in its own UNet runner (the default)."""
    from toonark.family import QwenImage, StableDiffusion
    from toonark.serving.repository import default_unet_loop, repo_configs
    assert StableDiffusion.device_loop and not QwenImage.device_loop
    assert default_unet_loop("ort-cuda", "python", StableDiffusion()) == "in_process"
    assert default_unet_loop("ort-cuda", "python", QwenImage()) == "bls"
    assert default_unet_loop("ort-cuda", "onnxruntime_onnx", QwenImage()) == "bls"
    assert default_unet_loop("ort-cuda", "python", StableDiffusion(), loras=True) == "bls"
    assert default_unet_loop("ort-cpu", "python", StableDiffusion(), loras=True) == "in_process"
    lora = repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", loras=["toon"])
    assert "unet" in lora and "max_batch_size: 0" in lora["denoise"]
    assert '"unet_loop" value: { string_value: "bls" }' in lora["denoise"] and 'name: "lora"' in lora["denoise"]
    cpu = repo_configs(SD_INFO, loras=["toon"])
    assert "unet" not in cpu and '"unet_loop" value: { string_value: "in_process" }' in cpu["denoise"]
    assert 'name: "lora"' in cpu["denoise"] and '"lora_cache_size" value: { string_value: "4" }' in cpu["denoise"]
    for loop in ("in_process", "bls_device"):
        with pytest.raises(ValueError, match=f"LoRA styles are switched in the UNet's runner on host tensors.*unet_loop "
                                             f"{loop} on ort-cuda bypasses it"):
            repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", loras=["toon"], unet_loop=loop)
        with pytest.raises(ValueError, match=f"unet_loop {loop} runs Stable Diffusion's solver step graph; the "
                                             f"qwen-image family's denoise calls its transformer by BLS"):
            repo_configs(SD_INFO, backend="ort-cuda", precision="fp16", family=QwenImage(), unet_loop=loop)


def test_bls_device_loop_matches_the_host_loop(tiny_engines):
    """BlsDeviceLoop with the UNet called through DLPack views (as the Triton model hands them to BLS) gives the
    host loop's latents to float rounding."""
    from toonark.engines.build import load_engine
    from toonark.triton_model_repo.runtime import BlsDeviceLoop, Denoiser
    from toonark.layout import BuildLayout
    info = BuildInfo.read(tiny_engines)
    denoiser = Denoiser(BuildLayout(tiny_engines).pipeline, info)
    unet = load_engine(tiny_engines, "ort-cpu", "fp32", "unet")
    seen = []

    def unet_dlpack(feeds):
        seen.append(sorted(type(v).__name__ for v in feeds.values()))
        arrays = {name: np.from_dlpack(value) if hasattr(value, "__dlpack_device__") else value
                  for name, value in feeds.items()}
        return unet.run(arrays)[unet.spec.output_names[0]]   # numpy has __dlpack__ too

    rng = np.random.default_rng(1)
    text = rng.standard_normal((2, info.dims.text_length, info.dims.text_hidden)).astype(np.float32)
    request = dict(seed=[4], steps=3, guidance=7.5, width=64, height=64)
    host = denoiser.run(text, unet=lambda feeds: unet.run(feeds)[unet.spec.output_names[0]], **request)
    loop = BlsDeviceLoop(unet_dlpack, info.dims, denoiser.family, on_cuda=False)
    device = denoiser.run_loop(text, loop=loop, **request)
    assert len(seen) == 3 and seen[0] == ["OrtValueView", "OrtValueView", "ndarray"]
    assert device.shape == host.shape
    assert np.abs(device - host).max() <= 1e-4 * max(1.0, np.abs(host).max())


@pytest.fixture(scope="module", params=["in_process", "bls_device", "batched"])
def loop_server(request, tiny_engines, tmp_path_factory):
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    folder = tmp_path_factory.mktemp(f"loop-{request.param}")
    batched = request.param == "batched"
    repo = write_repo(tiny_engines, backend="ort-cpu", precision="fp32", out=folder / "repo", intra_op_threads=1,
                      unet_loop="in_process" if batched else request.param, batch_requests=batched)
    server = TritonServer(repo, log_path=folder / "tritonserver.log")
    try:
        server.start()
        server.wait_ready(300)
        yield request.param, server
    finally:
        server.stop()
        server.remove_shm()


@pytest.mark.server
def test_each_unet_loop_serves_the_offline_image(loop_server, tiny_engines):
    """in_process (the UNet engine inside denoise, host loop on ort-cpu) serves the offline pipeline's exact PNG
    bytes; bls_device (DLPack BLS + the step graph) is within one uint8 level, as the device loop is offline."""
    from PIL import Image
    from toonark.engines.pipeline import load_pipeline
    from toonark.serving.client import GenerateOptions, generate
    from toonark.serving.launcher import repo_models
    from toonark.triton_model_repo.runtime import encode_png
    kind, server = loop_server
    assert ("unet" in repo_models(server.repo)) == (kind == "bls_device")
    offline = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32").generate(
        prompt=SUBJECT, seed=8, steps=3, width=64, height=128)
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        served = generate(url, GenerateOptions(SUBJECT, seed=8, steps=3, width=64, height=128), protocol).images[0]
        pixels = np.asarray(Image.open(io.BytesIO(served)).convert("RGB"))
        if kind == "in_process":
            assert served == encode_png(offline.images[0])
        else:
            assert np.abs(pixels.astype(np.int16) - offline.images[0].astype(np.int16)).max() <= 1
    raw = generate(server.http_url, GenerateOptions(SUBJECT, seed=8, steps=3, width=64, height=128,
                                                    format=api.RAW_FORMAT), "http")
    assert raw.pixels.shape == (1, 128, 64, 3)


@pytest.mark.server
def test_in_process_loops_serve_edits_and_tiled_sizes(loop_server, tiny_engines):
    """What the device loop does not take still gets served: an img2img request and a size above the profile
    run the host loop over the engine denoise owns (in_process), or alone beside the batch (request batching),
    and give the offline pipeline's PNG bytes; bls_device hands them to `unet` over BLS with host tensors."""
    from toonark.engines.pipeline import load_pipeline
    from toonark.serving.client import GenerateOptions, generate
    from toonark.triton_model_repo.runtime import encode_images
    kind, server = loop_server
    pipe = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")
    from PIL import Image
    picture = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    edit = dict(seed=4, steps=4, image_in=buffer.getvalue(), strength=0.6)
    big = dict(seed=2, steps=2, width=384, height=320)   # the test profile's max image is 256: 2x2 tiles
    for request in (edit, big):
        want = encode_images(pipe.generate(prompt=SUBJECT, **request).decoded, "png")[0]
        got = generate(server.http_url, GenerateOptions(SUBJECT, **request), "http").images[0]
        assert got == want, request.keys()


@pytest.mark.server
def test_batched_loop_groups_concurrent_requests(loop_server, tiny_engines):
    """Four concurrent requests of one size reach the batching denoise step in fewer executions than requests
    (Triton's dynamic batcher grouped them; the ensemble feeds it directly), and each image is its own offline
    image (within one uint8 level)."""
    import threading
    from PIL import Image
    from toonark.engines.pipeline import load_pipeline
    from toonark.serving.client import GenerateOptions, connect, generate
    kind, server = loop_server
    if kind != "batched":
        pytest.skip("request batching only")
    results, barrier = {}, threading.Barrier(4)

    def client(seed: int) -> None:
        protocol = "http" if seed % 2 else "grpc"
        connection = connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
        barrier.wait()
        results[seed] = generate(server.http_url if protocol == "http" else server.grpc_url,
                                 GenerateOptions(SUBJECT, seed=seed, steps=3, width=64, height=64), protocol,
                                 client=connection).images[0]
        connection.close()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in (20, 21, 22, 23)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [20, 21, 22, 23]
    stats = {m["name"]: m for m in connect(server.http_url).get_inference_statistics()["model_stats"]}
    assert "denoise_loop" not in stats and int(stats["denoise"]["inference_count"]) >= 4
    loop = stats["denoise"]
    assert int(loop["execution_count"]) < int(loop["inference_count"]), loop
    pipe = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")
    for seed, png in results.items():
        expected = pipe.generate(prompt=SUBJECT, seed=seed, steps=3, width=64, height=64).images[0]
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert np.abs(pixels.astype(np.int16) - expected.astype(np.int16)).max() <= 1


def test_run_batch_groups_requests_and_answers_each_alone(tiny_engines):
    """Denoiser.run_batch: requests with the same steps, guidance and size share a loop (chunks of 4/2/1 images),
    each gets its own latents (as run_loop gives them alone, to float rounding), and a bad request fails alone."""
    from toonark.engines.build import load_engine
    from toonark.engines.ort_loop import DeviceLoop
    from toonark.layout import BuildLayout
    from toonark.triton_model_repo.runtime import DenoiseRequest, Denoiser, RequestError, _chunks
    assert [[e[1] for e in c] for c in _chunks([(0, 1, 0), (1, 1, 0), (2, 1, 0)], (1, 2, 4))] == [[1, 1], [1]]
    info = BuildInfo.read(tiny_engines)
    denoiser = Denoiser(BuildLayout(tiny_engines).pipeline, info)
    loop = DeviceLoop({"unet": load_engine(tiny_engines, "ort-cpu", "fp32", "unet")}, info.dims, denoiser.family)
    sizes = []

    def loop_for(batch, height, width):
        sizes.append((batch, height, width))
        return loop
    rng = np.random.default_rng(2)

    def text(batch):
        return rng.standard_normal((2 * batch, info.dims.text_length, info.dims.text_hidden)).astype(np.float32)
    items = [DenoiseRequest(text(1), [1], 2, 7.5, 64, 64), DenoiseRequest(text(1), [5], 2, 7.5, 64, 64),
             DenoiseRequest(text(1), [1], 2, 3.0, 64, 64),      # other guidance
             DenoiseRequest(text(2), [5, 6], 2, 7.5, 64, 128),  # other size
             DenoiseRequest(text(1), [1, 2, 3], 2, 7.5, 64, 64)]  # 3 seeds for 1 image: refused
    results = denoiser.run_batch(items, loop_for)
    assert isinstance(results[4], RequestError) and "3 seeds for 1 images" in str(results[4])
    # items 0 + 1 share one loop; item 2 (other guidance) and item 3 (other size) run alone
    assert sorted(sizes) == [(1, 64, 64), (2, 64, 64), (2, 128, 64)]
    for item, got in zip(items[:4], results[:4]):
        alone = denoiser.run_loop(item.text_embeddings, loop=loop, **item.options())
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() <= 1e-4 * max(1.0, np.abs(alone).max())
    # pad (CUDA graphs): 3 one-image requests run as one B=4 loop (a repeated row fills the graph), each still
    # getting what it gets alone; without pad they split into B=2 + B=1
    assert [[e[1] for e in c] for c in _chunks([(0, 1, 0), (1, 1, 0), (2, 1, 0)], (1, 2, 4), pad=True)] == [[1, 1, 1]]
    three = [DenoiseRequest(text(1), [seed], 2, 7.5, 64, 64) for seed in (7, 8, 9)]
    sizes.clear()
    padded = denoiser.run_batch(three, loop_for, (1, 2, 4), pad=True)
    assert sizes == [(4, 64, 64)]
    for item, got in zip(three, padded):
        alone = denoiser.run_loop(item.text_embeddings, loop=loop, **item.options())
        assert got.shape == alone.shape == (1, *alone.shape[1:])
        assert np.abs(got - alone).max() <= 1e-4 * max(1.0, np.abs(alone).max())
