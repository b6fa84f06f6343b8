"""The Qwen-Image family served for real (issue 17): the same `toonark` ensemble inputs and outputs as
Stable Diffusion (kid template, safety check, presets, text-encoder cache, metrics), generated from the
family's declarations, on the bundled tritonserver over HTTP and gRPC."""
from __future__ import annotations

import io

import numpy as np
import pytest

from toonark.serving.client import GenerateOptions, ServerError, generate

pytestmark = pytest.mark.server

SUBJECT = "a happy otter with a kite"
READY_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def qwen_repo(qwen_engines):
    from toonark.serving.repository import write_repo
    return write_repo(qwen_engines, backend="ort-cpu", precision="fp32", layout="python", intra_op_threads=1)


@pytest.fixture(scope="module")
def qwen_server(qwen_repo, tmp_path_factory):
    from toonark.serving.launcher import TritonServer
    server = TritonServer(qwen_repo, log_path=tmp_path_factory.mktemp("qwen-triton-log") / "tritonserver.log")
    try:
        server.start()
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()
        assert not server.remove_shm()


def pixels(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_repository_has_the_family_models_and_routes_ids_to_denoise(qwen_repo):
    from toonark.serving.launcher import repo_models
    assert set(repo_models(qwen_repo)) == {"toonark", "preprocess", "text_encoder", "denoise", "transformer",
                                           "vae_decoder", "postprocess"}
    denoise = (qwen_repo / "denoise" / "config.pbtxt").read_text()
    assert 'name: "input_ids"' in denoise and '"unet_model" value: { string_value: "transformer" }' in denoise
    # preprocess -> text_encoder (the prompt cache) -> denoise, which reads the token ids from preprocess too.
    preprocess = (qwen_repo / "preprocess" / "config.pbtxt").read_text().split("output [")[1]
    assert 'name: "input_ids"' in preprocess and "text_encoder_model" not in preprocess
    ensemble = (qwen_repo / "toonark" / "config.pbtxt").read_text()
    assert 'model_name: "text_encoder" model_version: -1 input_map { key: "input_ids" value: "input_ids" }' in ensemble
    assert '"prompt_cache_bytes"' in (qwen_repo / "text_encoder" / "config.pbtxt").read_text()
    sd_inputs = [line for line in ensemble.split("output [")[0].splitlines() if "name:" in line]
    from toonark.api import ENSEMBLE_INPUTS
    assert len(sd_inputs) == len(ENSEMBLE_INPUTS) + 1   # the ensemble's own name line + every declared input


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_bytes_equal_the_offline_pipeline(qwen_server, qwen_engines, protocol):
    """Same request through Triton and through QwenImageText2ImagePipeline.generate: identical pixels."""
    from toonark.engines.pipeline import load_pipeline
    offline = load_pipeline(qwen_engines, "ort-cpu", "fp32")
    request = dict(seed=11, steps=3, guidance=4.0, width=64, height=96)
    expected = offline.generate(prompt=SUBJECT, **request).images[0]
    url = qwen_server.http_url if protocol == "http" else qwen_server.grpc_url
    result = generate(url, GenerateOptions(SUBJECT, **request), protocol, timings=True)
    served = pixels(result.images[0])
    assert served.shape == (96, 64, 3)
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert result.stages_ms["transformer"]["calls"] == 3


def test_defaults_presets_and_num_images(qwen_server, qwen_engines):
    from toonark.prompts import PromptPolicy
    from toonark.specs import BuildInfo
    limits = BuildInfo.read(qwen_engines).limits
    result = generate(qwen_server.http_url, GenerateOptions(SUBJECT, preset="fast", num_images=2), timings=True)
    assert len(result.images) == 2
    assert pixels(result.images[0]).shape == (limits.opt_image, limits.opt_image, 3)
    assert result.stages_ms["transformer"]["calls"] == PromptPolicy.load().presets["fast"]
    single = generate(qwen_server.http_url, GenerateOptions(SUBJECT, preset="fast", seed=1))
    assert single.images[0] == result.images[1]      # image i of NUM_IMAGES is seed + i alone


@pytest.mark.parametrize("options, message", [
    (dict(width=72, height=64), "width 72 must be a multiple of 16"),
    (dict(format="gif"), "FORMAT 'gif'"),
    (dict(steps=0), "steps"),
    (dict(prompt="a kid with a gun"), r'prompt refused \(weapons\)'),
    (dict(prompt="a cat counting " + "7" * 150), "PROMPT is too long: .* the text encoder reads 96"),
])
def test_refusals_as_for_stable_diffusion(qwen_server, options, message):
    options = {"prompt": SUBJECT, "steps": 2, "width": 64, "height": 64, **options}
    for protocol in ("http", "grpc"):
        url = qwen_server.http_url if protocol == "http" else qwen_server.grpc_url
        with pytest.raises(ServerError, match=message):
            generate(url, GenerateOptions(**options), protocol)
    assert qwen_server.is_ready()


def test_metrics_and_prompt_cache(qwen_server):
    """toonark's prompt-embedding cache in the text_encoder step (its engine runs on a miss only): the same
    prompt again is a hit that does not run the text encoder's engine, and draws the picture its first request
    drew."""
    import urllib.request

    def counters():
        text = urllib.request.urlopen(qwen_server.metrics_url).read().decode()
        values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(("toonark_prompt_cache_hits_total", "toonark_prompt_cache_misses_total",
                                      'toonark_stage_duration_seconds_count{stage="text_encoder"'))}
        return text, values

    _, before = counters()
    images = [generate(qwen_server.http_url, GenerateOptions("a fluffy bunny on a hill", seed=seed, steps=2,
                                                             width=64, height=64)).images[0] for seed in (1, 2, 1)]
    text, after = counters()
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    assert 'toonark_steps_total' in text and 'stage="transformer"' in text
    assert moved["toonark_prompt_cache_misses_total"] == 1 and moved["toonark_prompt_cache_hits_total"] == 2, moved
    assert moved['toonark_stage_duration_seconds_count{stage="text_encoder"}'] == 1, moved
    assert images[0] == images[2] and images[0] != images[1]
