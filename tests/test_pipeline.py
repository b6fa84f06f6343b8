"""The numpy pipeline over ORT CPU engines of the tiny model against diffusers'
StableDiffusionPipeline on the same weights, scheduler config and starting noise."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from toonark.specs import PipelineDims
from toonark.engines.pipeline import load_pipeline
from toonark.pipeline import (Text2ImagePipeline, classifier_free_guidance, initial_latents, load_tokenizer,
                              to_uint8_hwc, tokenize)

SIZE, STEPS = 128, 12
# fp32 ORT vs fp32 PyTorch over 12 solver steps and the VAE; images in [0, 1].
MAX_IMAGE_DIFF = 1e-3
PROMPTS = ["a happy cartoon fox reading a book", "Two PANDAS, playing 3 drums! (watercolor)"]
NEGATIVE = "scary, dark"


@pytest.fixture(scope="module")
def pipeline(tiny_engines) -> Text2ImagePipeline:
    return load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(tiny_model):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(1)   # tests share the CPU cores with other jobs
    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


def to_unit_hwc(decoded: np.ndarray) -> np.ndarray:
    """Our VAE output as diffusers' output_type="np" gives it: (B, H, W, 3) in [0, 1]."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("batch, guidance", [(1, 7.5), (2, 7.5), (1, 1.0)])
def test_matches_diffusers(pipeline, reference, batch, guidance):
    import torch
    prompts = PROMPTS[:batch]
    latents = initial_latents(3, batch, pipeline.dims, SIZE, SIZE, init_noise_sigma=pipeline.scheduler.init_noise_sigma)
    ours = pipeline(prompts, negative_prompt=NEGATIVE, seed=3, steps=STEPS, guidance=guidance, width=SIZE,
                    height=SIZE, batch=batch)
    # At guidance 1.0 diffusers skips the unconditional branch; we still run it (2B engine profiles)
    # and the guided prediction reduces to the conditional one.
    with torch.no_grad():
        ref = reference(prompts, negative_prompt=[NEGATIVE] * batch, num_inference_steps=STEPS,
                        guidance_scale=guidance, width=SIZE, height=SIZE, latents=torch.from_numpy(latents.copy()),
                        output_type="np").images
    diff = float(np.abs(to_unit_hwc(ours.decoded) - ref).max())
    print(f"batch={batch} guidance={guidance}: max |image diff| vs diffusers = {diff:.2e}")
    assert ref.shape == (batch, SIZE, SIZE, 3)
    assert diff < MAX_IMAGE_DIFF
    np.testing.assert_array_equal(ours.timesteps, reference.scheduler.timesteps.numpy())


def test_result_shape_timings_and_callback(pipeline):
    import time
    captured = []
    before = time.perf_counter()
    result = pipeline("a red balloon", seed=1, steps=8, width=SIZE, height=64 * 3,
                      step_callback=lambda i, t, feeds, latents: captured.append((i, t, feeds, latents)))
    outer_ms = (time.perf_counter() - before) * 1e3
    assert result.images.dtype == np.uint8 and result.images.shape == (1, 192, SIZE, 3)
    assert result.decoded.shape == (1, 3, 192, SIZE)
    timings = result.timings
    assert set(timings) == {"tokenize_ms", "text_encoder_ms", "unet_ms", "scheduler_ms", "vae_decoder_ms", "total_ms"}
    assert len(timings["unet_ms"]) == 8 and min(timings["unet_ms"]) > 0
    # The stages are disjoint intervals inside the request, which lies inside the caller's interval,
    # all in milliseconds: a stage timed twice, in seconds or in microseconds breaks one of these.
    parts = (timings["tokenize_ms"] + timings["text_encoder_ms"] + sum(timings["unet_ms"]) + timings["scheduler_ms"]
             + timings["vae_decoder_ms"])
    assert 0 < parts <= timings["total_ms"] <= outer_ms
    assert [i for i, *_ in captured] == list(range(8))
    assert [t for _, t, *_ in captured] == result.timesteps.tolist()
    _, t0, feeds, latents0 = captured[0]
    assert sorted(feeds) == ["encoder_hidden_states", "sample", "timestep"]
    assert feeds["sample"].shape == (2, 4, 24, 16) and feeds["sample"].dtype == np.float32
    assert feeds["timestep"].shape == (1,) and feeds["timestep"].dtype == np.float32 and feeds["timestep"] == t0
    assert feeds["encoder_hidden_states"].shape == (2, pipeline.dims.text_length, pipeline.dims.text_hidden)
    np.testing.assert_array_equal(latents0, initial_latents(1, 1, pipeline.dims, 192, SIZE))


def test_seed_and_guidance_change_the_image(pipeline):
    def run(seed, guidance):
        return pipeline("a smiling sun", seed=seed, steps=8, guidance=guidance, width=SIZE, height=SIZE).decoded
    base = run(5, 7.5)
    np.testing.assert_array_equal(base, run(5, 7.5))
    assert np.abs(base - run(6, 7.5)).max() > 1e-2
    assert np.abs(base - run(5, 1.0)).max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), "width 100 must be a multiple of 64"),
    (dict(batch=3), "batch 3 is outside the built range 1..2"),
    (dict(prompt=["a", "b"], batch=1), "prompt must be a string or 1 strings (batch=1)"),
    (dict(guidance=float("nan")), "guidance nan must be a finite number"),
    (dict(steps=0), "num_inference_steps=0 must be an integer"),
    (dict(seed=-1), "seed -1 must be a non-negative integer"),
])
def test_bad_requests_raise(pipeline, kwargs, message):
    kwargs = dict(dict(prompt="a kite", width=SIZE, height=SIZE), **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline(**kwargs)


def test_tokenizer_matches_transformers(tiny_model):
    from transformers import CLIPTokenizer
    slow = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    ours = load_tokenizer(tiny_model / "tokenizer")
    long_prompt = "a very " + "very " * 90 + "long prompt about a friendly dragon"
    prompts = ["", "a cat", "A Cat!!", "don't stop; it's 2024 o'clock", "  spaced\tout\nprompt  ",
               "café naïve façade", "emoji 🦊 fox", "semi-transparent red/blue balloons, 4k, hd", long_prompt]
    ids, truncated = tokenize(ours, prompts, 77)
    want = slow(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.dtype == np.int64 and ids.shape == (len(prompts), 77)
    np.testing.assert_array_equal(ids, want)
    assert truncated == [False] * (len(prompts) - 1) + [True]


def test_pipeline_modules_do_not_import_torch(tiny_model):
    """The Triton Python backend imports these; torch must not come with them."""
    code = ("import sys; from toonark.pipeline import load_tokenizer, tokenize; import toonark.scheduler; "
            f"tokenize(load_tokenizer({str(tiny_model / 'tokenizer')!r}), ['a cat'], 77); "
            "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_initial_latents_are_seeded_float32():
    dims = PipelineDims(text_length=77, text_hidden=32, latent_channels=4, vae_scale=8, vae_scaling_factor=0.18215)
    a = initial_latents(42, 2, dims, 128, 64)
    assert a.dtype == np.float32 and a.shape == (2, 4, 16, 8)
    np.testing.assert_array_equal(a, initial_latents(42, 2, dims, 128, 64))
    assert not np.array_equal(a, initial_latents(43, 2, dims, 128, 64))
    np.testing.assert_array_equal(initial_latents(42, 2, dims, 128, 64, init_noise_sigma=2.0), 2 * a)
    with pytest.raises(ValueError, match="height 100 must be a positive multiple of 8"):
        initial_latents(0, 1, dims, 100, 64)


def test_guidance_and_uint8_conversion():
    uncond, cond = np.zeros((1, 4, 2, 2), np.float32), np.ones((1, 4, 2, 2), np.float32)
    np.testing.assert_array_equal(classifier_free_guidance(np.concatenate([uncond, cond]), 7.5), cond * 7.5)
    images = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32).reshape(1, 3, 1, 2)
    out = to_uint8_hwc(images)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    assert out.transpose(0, 3, 1, 2).ravel().tolist() == [0, 0, 128, 255, 255, 255]


def _scheduler(prediction_type="epsilon", solver_order=2):
    from types import SimpleNamespace
    return SimpleNamespace(config=SimpleNamespace(prediction_type=prediction_type, solver_order=solver_order))


def test_device_loop_default_falls_back_to_the_host_loop_for_v_prediction():
    from toonark.engines.pipeline import use_device_loop
    assert use_device_loop("ort-cuda", None, _scheduler()) is True
    # A scheduler the step graph cannot express (order 3) runs on the host loop instead of raising.
    assert use_device_loop("ort-cuda", None, _scheduler("v_prediction")) is True   # linear step form too
    assert use_device_loop("ort-cuda", None, _scheduler(solver_order=3)) is False
    for backend in ("ort-cpu", "trt"):
        assert use_device_loop(backend, None, _scheduler()) is False
    assert use_device_loop("ort-cuda", False, _scheduler()) is False


def test_explicit_device_loop_is_refused_where_it_cannot_run():
    from toonark.engines.pipeline import use_device_loop
    with pytest.raises(ValueError, match="use the host loop"):
        use_device_loop("ort-cuda", True, _scheduler(solver_order=3))
    with pytest.raises(ValueError, match="device_loop runs ONNX Runtime engines"):
        use_device_loop("trt", True, _scheduler())
    assert use_device_loop("ort-cpu", True, _scheduler()) is True


def test_from_build_refuses_device_loop_before_loading_engines(tiny_build, monkeypatch):
    import toonark.engines.pipeline
    loaded = []
    monkeypatch.setattr(toonark.engines.pipeline, "load_engine", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(ValueError, match="device_loop runs ONNX Runtime engines"):
        load_pipeline(tiny_build, backend="trt", device_loop=True)
    assert loaded == []


def test_generate_draws_the_golden_pixels_and_refuses_like_the_server(tiny_engines):
    """Text2ImagePipeline.generate takes the served request (subjects, presets, NUM_IMAGES...), resolves it
    with toonark.api like preprocess does, and draws the golden pictures (tests/golden_images.py) for the same
    requests; a request the server refuses is refused here with the served message."""
    import golden_images
    from toonark.api import RequestError
    pipe = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32", threads=1)
    for name, request in golden_images.read()["requests"].items():
        assert golden_images.difference(name, pipe.generate(**request).images) is None
    with pytest.raises(RequestError, match=r"^GUIDANCE 31.0 is out of range; use 0..30 \(7.5 is typical\)$"):
        pipe.generate(prompt="a kite", guidance=31)
    with pytest.raises(RequestError, match="NUM_IMAGES 5 is out of range; use 1..4"):
        pipe.generate(prompt="a kite", num_images=5)
    with pytest.raises(ValueError, match="guidance 31 is out of range; use 0..30"):
        pipe("a kite", guidance=31, width=SIZE, height=SIZE)


def test_model_family_comes_from_model_index(tiny_model, tmp_path):
    """The family is read from model_index.json: the tiny diffusers folder is Stable Diffusion (its specs are
    the declarations the build uses); a pipeline class toonark has no family for is refused by name."""
    import json
    from toonark.family import StableDiffusion, family_for_folder
    from toonark.specs import submodel_specs
    family = family_for_folder(tiny_model)
    assert isinstance(family, StableDiffusion)
    dims = family.dims_from_folder(tiny_model)
    assert family.specs(dims) == submodel_specs(dims) and family.served_submodels[0] == "text_encoder"
    latents = np.full((1, dims.latent_channels, 2, 2), 2.0, np.float32)
    np.testing.assert_array_equal(family.latents_to_vae(latents, dims), latents / np.float32(dims.vae_scaling_factor))
    assert family.vae_input_scale(dims) == 1.0 / dims.vae_scaling_factor
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline' is not a model family toonark knows"):
        family_for_folder(tmp_path)
