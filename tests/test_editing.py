"""Image-to-image and inpainting on the tiny pipeline against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (same weights, scheduler config, pictures and noise), and the bounded
decoding of IMAGE_IN / MASK_IN (each bad file a clear RequestError before any model runs).

torch's and numpy's generators differ, so the noises are injected into diffusers as the text-to-image
test injects its starting latents: the start noise through `randn_tensor` (img2img) or `latents`
(inpainting), the VAE encoder's Gaussian samples through `retrieve_latents` (mean + std * our noise)."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest

from toonark import editing
from toonark.api import RequestError
from toonark.engines.pipeline import load_pipeline
from toonark.image_input import EditInput, decode_picture, mask_pixels, pixels, read_edit
from toonark.pipeline import initial_latents

SIZE, STEPS = 128, 12
MAX_IMAGE_DIFF = 1e-3    # the text-to-image tolerance (tests/test_pipeline.py): fp32 ORT vs fp32 PyTorch
PROMPT, NEGATIVE = "a happy cartoon fox reading a book", "scary, dark"


def picture(size=SIZE, seed=0, mode="RGB") -> "Image":
    """A smooth synthetic picture (gradients + a disc), so resizing and encoding see structure."""
    from PIL import Image
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + seed)], -1)
    rgb[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).convert(mode)


def png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def square_mask(size=SIZE):
    from PIL import Image
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32", threads=1)


class InjectedNoise:
    """Patches a diffusers pipeline module: retrieve_latents returns mean + std * the next of `samples`."""

    def __init__(self, module, monkeypatch, samples: list[np.ndarray], start_noise: np.ndarray | None = None):
        import torch
        self.samples = list(samples)

        def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):
            dist = encoder_output.latent_dist
            eps = torch.from_numpy(self.samples.pop(0)).to(dist.mean.dtype)
            return dist.mean + dist.std * eps
        monkeypatch.setattr(module, "retrieve_latents", retrieve_latents)
        if start_noise is not None:
            monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(start_noise.copy()))


def unit(decoded):
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(pipe, tiny_model, monkeypatch, strength):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module
    torch.set_num_threads(1)
    ref = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    image = picture()
    seed = 5
    edit = EditInput(pixels(image, SIZE, SIZE), None, strength)
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, width=SIZE, height=SIZE, edit=edit)
    noise = initial_latents(seed, 1, pipe.dims, SIZE, SIZE)
    sample = editing.posterior_noise([seed], 1, noise.shape, editing.IMAGE_STREAM)
    InjectedNoise(module, monkeypatch, [sample], noise)
    with torch.no_grad():
        want = ref(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=7.5, output_type="np").images
    diff = float(np.abs(unit(ours.decoded) - want).max())
    print(f"img2img strength {strength}: max |image diff| vs diffusers = {diff:.2e}")
    assert diff < MAX_IMAGE_DIFF
    # the edit starts where diffusers starts: the last int(steps * strength) steps
    assert editing.start_index(STEPS, strength) == STEPS - int(STEPS * strength)
    assert len(ours.timings["unet_ms"]) == int(STEPS * strength)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_the_standard_unet_matches_diffusers(pipe, tiny_model, monkeypatch, strength):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    torch.set_num_threads(1)
    ref = StableDiffusionInpaintPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    image, mask = picture(seed=1), square_mask()
    seed = 8
    edit = EditInput(pixels(image, SIZE, SIZE), mask_pixels(mask, SIZE, SIZE), strength)
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, width=SIZE, height=SIZE, edit=edit)
    noise = initial_latents(seed, 1, pipe.dims, SIZE, SIZE)
    shape = noise.shape
    # diffusers encodes the picture, then the masked picture (discarded with a 4-channel UNet)
    # (not through `latents=`: diffusers then starts from that noise even at strength < 1)
    InjectedNoise(module, monkeypatch, [editing.posterior_noise([seed], 1, shape, editing.IMAGE_STREAM),
                                        editing.posterior_noise([seed], 1, shape, editing.MASKED_IMAGE_STREAM)], noise)
    with torch.no_grad():
        want = ref(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images
    diff = float(np.abs(unit(ours.decoded) - want).max())
    print(f"inpaint (4-channel UNet) strength {strength}: max |image diff| vs diffusers = {diff:.2e}")
    assert diff < MAX_IMAGE_DIFF


# --- bounded decoding ------------------------------------------------------------------------

def _truncated() -> bytes:
    data = png_bytes(picture(64), format="JPEG", quality=90)
    return data[: len(data) // 2]


def _bomb(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels (900 M: above Pillow's own limit; 25 M: below it, above
    ours) with a tiny body: refused by its header, nothing decoded."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _sixteen_bit() -> bytes:
    from PIL import Image
    return png_bytes(Image.fromarray(np.full((64, 64), 40000, np.uint16)))


def _sixteen_bit_rgb() -> bytes:
    """A 16-bit RGB PNG (Pillow opens it as 8-bit RGB; the IHDR says 16)."""
    import struct
    import zlib
    raw = b"".join(b"\0" + b"\x12\x34" * 3 * 8 for _ in range(8))
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _animated() -> bytes:
    frames = [picture(64, seed=i) for i in range(3)]
    return png_bytes(frames[0], format="WEBP", save_all=True, append_images=frames[1:], duration=100)


def _animated_png() -> bytes:
    frames = [picture(64, seed=i) for i in range(2)]
    return png_bytes(frames[0], format="PNG", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("make, message", [
    (lambda: b"", "IMAGE_IN is empty"),
    (lambda: b"GIF89a" + b"\0" * 20, "IMAGE_IN is not a PNG, WebP or JPEG file"),
    (lambda: png_bytes(picture(64), format="GIF"), "IMAGE_IN is not a PNG, WebP or JPEG file"),
    (lambda: b"\0" * (21 * 2 ** 20), "IMAGE_IN is 21.0 MiB, more than the 20 MiB allowed"),
    (_bomb, "IMAGE_IN has 900000000 pixels, more than the 16777216 allowed (a decompression bomb"),
    (lambda: _bomb(5000), "IMAGE_IN has 25000000 pixels, more than the 16777216 allowed (a decompression bomb"),
    (_truncated, "IMAGE_IN is truncated or corrupt"),
    (lambda: png_bytes(picture(64, mode="CMYK"), format="JPEG"), "IMAGE_IN is a CMYK JPEG"),
    (_sixteen_bit, "IMAGE_IN is a 16-bit PNG"),
    (_sixteen_bit_rgb, "IMAGE_IN is a 16-bit PNG (mode RGB)"),
    (_animated, "IMAGE_IN is an animated WEBP (3 frames)"),
    (_animated_png, "IMAGE_IN is an animated PNG (2 frames)"),
])
def test_bad_pictures_are_refused_before_decoding(make, message):
    with pytest.raises(RequestError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_picture(make())


def test_good_pictures_decode_in_every_format():
    image = picture(64)
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})):
        decoded = decode_picture(png_bytes(image, format=fmt, **kwargs))
        assert decoded.size == (64, 64) and decoded.format == fmt
    rgba = decode_picture(png_bytes(picture(64, mode="RGBA")))
    np.testing.assert_array_equal(pixels(rgba, 64, 64), pixels(image, 64, 64))   # alpha dropped as diffusers does


def test_read_edit_sizes_strength_and_mask(tiny_engines):
    from toonark.specs import BuildInfo
    limits = BuildInfo.read(tiny_engines).limits
    data = png_bytes(picture(200))
    edit, width, height = read_edit(data, None, None, None, None, limits, 0.8)
    assert (width, height) == (192, 192) and edit.image.shape == (1, 3, 192, 192) and edit.strength == 0.8
    assert edit.image.min() >= -1 and edit.image.max() <= 1 and edit.mask is None
    edit, *_ = read_edit(data, png_bytes(square_mask(200)), 0.5, 128, 64, limits, 1.0)
    assert edit.image.shape == (1, 3, 64, 128) and edit.mask.shape == (1, 1, 64, 128)
    assert set(np.unique(edit.mask)) == {0.0, 1.0}
    for strength in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(RequestError, match=rf"^STRENGTH {strength} is out of range; use 0 < STRENGTH <= 1"):
            read_edit(data, None, strength, None, None, limits, 0.8)
    with pytest.raises(RequestError, match="^MASK_IN is 64x64 but IMAGE_IN is 200x200"):
        read_edit(data, png_bytes(square_mask(64)), None, None, None, limits, 1.0)
    with pytest.raises(RequestError, match="^STRENGTH needs IMAGE_IN"):
        read_edit(None, None, 0.5, None, None, limits, 0.8)
    with pytest.raises(RequestError, match=r"^width 100000 must be a multiple of 64 in 64..4096"):
        read_edit(data, None, None, 100000, 64, limits, 0.8)
    with pytest.raises(RequestError, match=r"^STRENGTH 0.05 with 12 steps runs no denoising step"):
        editing.start_index(12, 0.05)


# --- served == offline, over the shared tritonserver ------------------------------------------

from server_fixtures import triton_repo, triton_server  # noqa: E402,F401


def served(server, protocol="http", **options):
    from toonark.serving.client import GenerateOptions, generate
    url = server.http_url if protocol == "http" else server.grpc_url
    timings = options.pop("_timings", False)
    return generate(url, GenerateOptions(**options), protocol, timings=timings)


def offline_png(pipe, **request) -> bytes:
    from toonark.triton_model_repo.runtime import encode_images
    result = pipe.generate(**request)
    return encode_images(result.decoded, "png")[0], result


@pytest.mark.server
@pytest.mark.parametrize("protocol, mask, strength", [("http", False, 0.6), ("grpc", True, 0.7), ("http", True, None)])
def test_served_edit_equals_offline(triton_server, pipe, protocol, mask, strength):
    """IMAGE_IN (+ MASK_IN) over the ensemble: the same PNG bytes as the offline pipeline, and the picture's
    size is the request's when WIDTH/HEIGHT are not sent."""
    request = dict(prompt="a kitten on a beach", seed=4, steps=6, image_in=png_bytes(picture(130, seed=2)),
                   strength=strength)
    if mask:
        request["mask_in"] = png_bytes(square_mask(130))
    want, result = offline_png(pipe, **request)
    assert result.images.shape == (1, 128, 128, 3)   # 130 rounded down to the image step
    got = served(triton_server, protocol, **request)
    assert got.images[0] == want


@pytest.mark.server
def test_served_tiled_picture_equals_offline_and_reports_its_grid(triton_server, pipe):
    """A size above the profile (max 256 here) is made in tiles; served bytes equal offline, the unet is called
    once per tile group per step (offline), and --timings names the grid."""
    request = dict(prompt="a big friendly whale", seed=2, steps=3, width=384, height=320)
    want, result = offline_png(pipe, **request)
    assert result.timings["tiles"] == "2x2 tiles of 256x256 px, overlap 64 px"
    got = served(triton_server, "http", _timings=True, **request)
    assert got.images[0] == want
    assert got.tiles == "2x2 tiles of 256x256 px, overlap 64 px"
    # 4 tiles, 2 per call (the profile's 2 x max_batch rows = 4 = 2 tiles x 2 CFG rows): 2 calls a step (the
    # served UNet runs inside denoise in the default repository: its calls are not a Triton model's statistics)
    assert result.timings["unet_calls_per_step"] == 2 and "unet" not in got.stages_ms
    small = served(triton_server, "http", _timings=True, prompt="a cat", steps=1, width=64, height=64)
    assert small.tiles == "untiled (64x64 fits the profile's 256 px)"


@pytest.mark.server
@pytest.mark.parametrize("options, message", [
    (dict(image_in=b"GIF89a"), "IMAGE_IN is not a PNG, WebP or JPEG file"),
    (dict(image_in=_bomb()), "IMAGE_IN has 900000000 pixels"),
    (dict(image_in=_truncated()), "IMAGE_IN is truncated or corrupt"),
    (dict(image_in=_animated()), "IMAGE_IN is an animated WEBP (3 frames)"),
    (dict(image_in=_sixteen_bit()), "IMAGE_IN is a 16-bit PNG"),
    (dict(image_in=b"CMYK"), "IMAGE_IN is not a PNG, WebP or JPEG file"),
    (dict(strength=0.5), "STRENGTH needs IMAGE_IN"),
    (dict(image_in=b"x", strength=1.5), "STRENGTH 1.5 is out of range"),
    (dict(width=4160, height=64), "width 4160 must be a multiple of 64 in 64..4096"),
])
def test_served_bad_pictures_are_400s(triton_server, options, message):
    import tritonclient.http as httpclient
    from toonark.serving.client import ServerError
    before = httpclient.InferenceServerClient(triton_server.http_url).get_inference_statistics("text_encoder")
    with pytest.raises(ServerError, match=re.escape(message)):
        served(triton_server, "http", prompt="a cat", steps=1, **options)
    after = httpclient.InferenceServerClient(triton_server.http_url).get_inference_statistics("text_encoder")
    # refused in preprocess: no model ran
    count = lambda s: s["model_stats"][0]["inference_stats"]["success"]["count"]  # noqa: E731
    assert count(after) == count(before)


# --- the 9-channel inpainting UNet -----------------------------------------------------------

@pytest.fixture(scope="module")
def inpaint_build(tmp_path_factory):
    """A tiny StableDiffusionInpaintPipeline (UNet in_channels 9), exported fp32 and built for ORT CPU."""
    from conftest import TEST_LIMITS
    from toonark.engines.build import build_engines
    from toonark.export.onnx_export import export_pipeline
    from toonark.export.pipelines import build_pipeline
    root = tmp_path_factory.mktemp("tiny-inpaint")
    model = build_pipeline(root / "model", kind="tiny-inpaint", seed=0)
    export_pipeline(model, root / "build", precisions=("fp32",), limits=TEST_LIMITS)
    build_engines(root / "build", backend="ort-cpu", precision="fp32")
    return model, root / "build"


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_unet_matches_diffusers(inpaint_build, monkeypatch, strength):
    """The declarations cover the 9-channel UNet (sample = latents 4 + mask 1 + masked-picture latents 4), and
    the pipeline feeds it as diffusers does, without blending."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from toonark.specs import BuildInfo
    torch.set_num_threads(1)
    model, build = inpaint_build
    info = BuildInfo.read(build)
    assert (info.dims.latent_channels, info.dims.unet_channels) == (4, 9)
    assert info.specs["unet"].inputs[0].shape({"B": 1, "H": 64, "W": 64}) == (2, 9, 8, 8)
    assert info.specs["unet"].outputs[0].shape({"B": 1, "H": 64, "W": 64}) == (2, 4, 8, 8)
    pipe = load_pipeline(build, backend="ort-cpu", precision="fp32", threads=1)
    ref = StableDiffusionInpaintPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    image, mask = picture(seed=3), square_mask()
    seed = 6
    edit = EditInput(pixels(image, SIZE, SIZE), mask_pixels(mask, SIZE, SIZE), strength)
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, width=SIZE, height=SIZE, edit=edit)
    noise = initial_latents(seed, 1, pipe.dims, SIZE, SIZE)
    shape = noise.shape
    samples = [editing.posterior_noise([seed], 1, shape, editing.MASKED_IMAGE_STREAM)]
    if strength < 1:   # diffusers encodes the picture only when it starts from it
        samples.insert(0, editing.posterior_noise([seed], 1, shape, editing.IMAGE_STREAM))
    InjectedNoise(module, monkeypatch, samples, noise)
    with torch.no_grad():
        want = ref(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images
    diff = float(np.abs(unit(ours.decoded) - want).max())
    print(f"inpaint (9-channel UNet) strength {strength}: max |image diff| vs diffusers = {diff:.2e}")
    assert diff < MAX_IMAGE_DIFF
    with pytest.raises(RequestError, match="^this build's UNet is an inpainting UNet: send MASK_IN"):
        pipe(PROMPT, seed=seed, steps=STEPS, width=SIZE, height=SIZE, edit=EditInput(edit.image, None, 0.5))
    with pytest.raises(RequestError, match="^this build's UNet is an inpainting UNet: send IMAGE_IN and MASK_IN"):
        pipe.generate(prompt="a cat", steps=2)   # text-to-image: refused as the server refuses it


@pytest.mark.server
def test_generate_script_edits_and_prints_the_tile_grid(triton_server, pipe, tmp_path, capsys):
    """scripts/generate.py --image-in FILE --strength S [--mask-in FILE]: the served picture (== offline), and
    --timings names the tile grid of a size above the profile."""
    from toonark.scripts.generate import main
    (tmp_path / "in.png").write_bytes(png_bytes(picture(128, seed=5)))
    (tmp_path / "mask.png").write_bytes(png_bytes(square_mask(128)))
    args = ["--url", triton_server.http_url, "--prompt", "a bear with a red hat", "--seed", "3", "--steps", "4",
            "--image-in", str(tmp_path / "in.png"), "--mask-in", str(tmp_path / "mask.png"), "--strength", "0.8",
            "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    want, _ = offline_png(pipe, prompt="a bear with a red hat", seed=3, steps=4, strength=0.8,
                          image_in=(tmp_path / "in.png").read_bytes(), mask_in=(tmp_path / "mask.png").read_bytes())
    assert (tmp_path / "out.png").read_bytes() == want
    assert main(["--url", triton_server.http_url, "--prompt", "a whale", "--steps", "1", "--width", "320",
                 "--height", "64", "--timings", "--out", str(tmp_path / "wide.png")]) == 0
    assert "tiles: 2x1 tiles of 256x64 px, overlap 64 px" in capsys.readouterr().out
    assert main(["--url", triton_server.http_url, "--prompt", "a whale", "--mask-in", str(tmp_path / "mask.png")]) == 1
    assert "--mask-in needs --image-in" in capsys.readouterr().err
