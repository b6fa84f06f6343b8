"""The `toonark` Triton ensemble served for real: the tritonserver bundled in nvidia-pytriton,
the generated repository of the tiny build (ORT CPU fp32 engines in Python-backend runners),
HTTP and gRPC clients. One server for the whole session (server_fixtures.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
# tests/ has no __init__.py: pytest's default import mode puts it on sys.path, so the sibling imports.
from server_fixtures import triton_repo, triton_server  # noqa: F401  (pytest fixtures)

from toonark.serving.client import GenerateOptions, ServerError, generate

pytestmark = pytest.mark.server

SIZE_W, SIZE_H, STEPS = 64, 128, 3   # non-square, so a swapped width/height shows
SUBJECT = "a happy otter with a kite"


def url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def decode(data: bytes):
    from PIL import Image
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_every_model_is_ready(triton_server, triton_repo):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from toonark.serving.launcher import repo_models
    models = repo_models(triton_repo)
    # the default python layout: denoise owns the UNet and the VAE encoder (the tiny build has one: IMAGE_IN is
    # served), so no model is a BLS callee (issue 18)
    assert set(models) == {"toonark", "preprocess", "text_encoder", "denoise", "vae_decoder", "postprocess"}
    for client in (httpclient.InferenceServerClient(triton_server.http_url),
                   grpcclient.InferenceServerClient(triton_server.grpc_url)):
        assert client.is_server_ready()
        for name in models:
            assert client.is_model_ready(name), name


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_png_of_requested_size(triton_server, protocol):
    result = generate(url(triton_server, protocol),
                      GenerateOptions(SUBJECT, seed=1, steps=STEPS, width=SIZE_W, height=SIZE_H), protocol)
    assert len(result.images) == 1 and result.images[0][:8] == b"\x89PNG\r\n\x1a\n"
    image = decode(result.images[0])
    assert (image.format, image.size, image.mode) == ("PNG", (SIZE_W, SIZE_H), "RGB")


def test_webp(triton_server):
    result = generate(triton_server.grpc_url, GenerateOptions(SUBJECT, seed=1, steps=STEPS, width=SIZE_W,
                                                              height=SIZE_W, format="webp"), "grpc")
    image = decode(result.images[0])
    assert (image.format, image.size) == ("WEBP", (SIZE_W, SIZE_W))


def test_seed_decides_the_image(triton_server):
    def png(seed):
        return generate(triton_server.http_url, GenerateOptions(SUBJECT, seed=seed, steps=2, width=SIZE_W,
                                                                height=SIZE_W)).images[0]
    first, again, other = png(5), png(5), png(6)
    assert first == again
    assert first != other


def test_defaults_apply_when_only_the_prompt_is_sent(triton_server, tiny_engines):
    from toonark.specs import BuildInfo
    limits = BuildInfo.read(tiny_engines).limits
    import urllib.request

    def steps_served():
        text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("toonark_steps_total"))
    before = steps_served()
    result = generate(triton_server.http_url, GenerateOptions(f"{SUBJECT} in the park", preset="fast"), timings=True)
    assert decode(result.images[0]).size == (limits.opt_image, limits.opt_image)
    from toonark.prompts import PromptPolicy
    assert steps_served() - before == PromptPolicy.load().presets["fast"]   # denoise owns the UNet: no unet model
    for stage in ("preprocess", "text_encoder", "denoise", "vae_decoder", "postprocess", "toonark"):
        assert result.stages_ms[stage]["calls"] == 1, stage


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_image_equals_offline_pipeline(triton_server, tiny_engines, protocol):
    """Same seed, prompt policy and engines: the server's pixels equal Text2ImagePipeline's."""
    from toonark.engines.pipeline import load_pipeline
    from toonark.prompts import PromptPolicy
    seed, steps, guidance = 11, 4, 6.0
    prompt, negative = PromptPolicy.load().compose(SUBJECT)
    offline = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")
    expected = offline(prompt, negative, seed=seed, steps=steps, guidance=guidance, width=SIZE_W,
                       height=SIZE_H).images[0]
    served = generate(url(triton_server, protocol), GenerateOptions(SUBJECT, seed=seed, steps=steps,
                                                                    guidance=guidance, width=SIZE_W,
                                                                    height=SIZE_H), protocol).images[0]
    pixels = np.asarray(decode(served))
    diff = np.abs(pixels.astype(np.int16) - expected.astype(np.int16)).max()
    print(f"\nserved vs offline ({protocol}): max |diff| = {diff} uint8 levels")
    assert pixels.shape == expected.shape
    assert diff <= 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_raw_format_returns_the_png_pixels(triton_server, protocol):
    """FORMAT=raw: PIXELS is the uint8 (B, H, W, 3) image the PNG of the same request encodes; IMAGE is empty,
    and a png request's PIXELS is empty."""
    options = dict(prompt=SUBJECT, seed=5, steps=2, width=SIZE_W, height=SIZE_H)
    raw = generate(url(triton_server, protocol), GenerateOptions(**options, format="raw"), protocol)
    png = generate(url(triton_server, protocol), GenerateOptions(**options, format="png"), protocol)
    assert raw.pixels is not None and raw.pixels.dtype == np.uint8
    assert raw.pixels.shape == (1, SIZE_H, SIZE_W, 3)
    assert raw.images == [b""] and png.pixels is None   # a png answer carries no pixels
    assert np.array_equal(raw.pixels[0], np.asarray(decode(png.images[0])))


def test_generate_script_writes_raw_pixels_as_npy(triton_server, tmp_path, capsys):
    from toonark.scripts import generate as script
    out = tmp_path / "otter.npy"
    assert script.main(["--url", triton_server.http_url, "--prompt", SUBJECT, "--seed", "5", "--steps", "2",
                        "--width", str(SIZE_W), "--height", str(SIZE_H), "--num-images", "2", "--out", str(out)]) == 0
    first, second = np.load(out), np.load(tmp_path / "otter-2.npy")
    assert first.shape == second.shape == (SIZE_H, SIZE_W, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, second)   # seeds 5 and 6
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [
    (dict(width=65, height=64), "width 65"),
    (dict(format="gif"), "FORMAT 'gif'"),
    (dict(steps=0), "steps"),
    (dict(prompt="a kid with a gun"), "gun"),
])
def test_bad_requests_fail_with_a_clear_message(triton_server, options, message):
    options = {"prompt": SUBJECT, "steps": 1, "width": SIZE_W, "height": SIZE_W, **options}
    for protocol in ("http", "grpc"):
        with pytest.raises(ServerError, match=message) as caught:
            generate(url(triton_server, protocol), GenerateOptions(**options), protocol)
        assert "\n" not in str(caught.value)
    assert triton_server.is_ready()


def test_generate_cli_round_trip(triton_server, tmp_path, capsys):
    from toonark.scripts.generate import main
    out = tmp_path / "otter.webp"
    assert main(["--url", triton_server.grpc_url, "--protocol", "grpc", "--prompt", SUBJECT, "--seed", "3",
                 "--steps", "2", "--width", "64", "--height", "64", "--out", str(out), "--timings"]) == 0
    assert decode(out.read_bytes()).format == "WEBP"
    printed = capsys.readouterr().out
    assert "denoise" in printed and "vae_decoder" in printed
    assert main(["--url", triton_server.http_url, "--prompt", SUBJECT, "--width", "100", "--out",
                 str(tmp_path / "bad.png")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "width 100" in errors[0]
    assert not (tmp_path / "bad.png").exists()


# --- generated configs against the export specs ---------------------------------------------------

def parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def io_rows(entries) -> list[tuple]:
    from tritonclient.grpc import model_config_pb2
    return [(e.name, model_config_pb2.DataType.Name(e.data_type), list(e.dims)) for e in entries]


def spec_rows(tensors) -> list[tuple]:
    from toonark.serving.repository import triton_type
    return [(t.name, "TYPE_" + triton_type(t.numpy_dtype("fp32")), t.triton_dims() or [1]) for t in tensors]


@pytest.mark.parametrize("layout, backend", [("python", "ort-cpu"), ("onnxruntime_onnx", "ort-cpu"),
                                             ("tensorrt_plan", "tensorrt")])
def test_config_io_equals_spec(tiny_engines, layout, backend):
    from toonark.specs import SERVED_SUBMODELS, BuildInfo
    from toonark.serving.repository import repo_configs
    info = BuildInfo.read(tiny_engines)
    # unet_loop bls: the unet model is in the repository (the python layout's default, in_process, has none)
    configs = {name: parse_config(text) for name, text in
               repo_configs(info, backend=backend, precision="fp32", layout=layout, unet_loop="bls").items()}
    for name in SERVED_SUBMODELS:
        config, spec = configs[name], info.specs[name]
        assert config.max_batch_size == 0
        assert io_rows(config.input) == spec_rows(spec.inputs), (layout, name)
        assert io_rows(config.output) == spec_rows(spec.outputs), (layout, name)
        expected = {"python": ("python", ""), "onnxruntime_onnx": ("", "onnxruntime_onnx"),
                    "tensorrt_plan": ("", "tensorrt_plan")}[layout]
        assert (config.backend, config.platform) == expected
    ensemble = configs["toonark"]
    assert ensemble.platform == "ensemble"
    # Every input is optional at the ensemble (2.51 would answer a missing PROMPT with "unexpected
    # deadlock"); preprocess refuses a request without PROMPT (tests/test_reliability.py).
    assert [i.name for i in ensemble.input if not i.optional] == []
    # Each ensemble-scope tensor is produced by exactly one step and every consumed one is produced.
    produced = [v for step in ensemble.ensemble_scheduling.step for v in step.output_map.values()]
    consumed = {v for step in ensemble.ensemble_scheduling.step for v in step.input_map.values()}
    assert len(produced) == len(set(produced))
    assert consumed <= set(produced) | {i.name for i in ensemble.input}


def test_served_configs_are_the_generated_ones(triton_server, triton_repo, tiny_engines):
    import tritonclient.http as httpclient
    from toonark.specs import BuildInfo
    info = BuildInfo.read(tiny_engines)
    client = httpclient.InferenceServerClient(triton_server.http_url)
    for name in ("text_encoder", "vae_decoder"):   # the default repository's engine models (denoise owns the UNet)
        served = client.get_model_config(name)
        rows = [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in served["input"]]
        assert rows == spec_rows(info.specs[name].inputs), name


def test_layout_mismatch_is_refused(tiny_engines):
    from toonark.specs import BuildInfo
    from toonark.serving.repository import repo_configs
    info = BuildInfo.read(tiny_engines)
    with pytest.raises(ValueError, match="tensorrt_plan"):
        repo_configs(info, backend="ort-cpu", layout="tensorrt_plan")
    with pytest.raises(ValueError, match="unknown layout"):
        repo_configs(info, layout="torchscript")
