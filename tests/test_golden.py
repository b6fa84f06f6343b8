"""Golden images: the sha256 of what the tiny build serves (IMAGE bytes) and of what the offline
pipeline draws (uint8 pixels) for a fixed set of varied requests, recorded before the issue-11
layout change. Issue 12 re-recorded the served hashes only, deliberately: PNG is encoded by fpng and WebP at
libwebp method 0 (README "Speed"); every offline pixel hash stayed the same, so the pixels did not move. Refactors must keep every byte: a moved default, a retyped tensor name, a scaling
factor applied twice or a changed solver coefficient changes a hash.

The tiny pipeline's weights are seeded (export.pipelines.build_pipeline(seed=0)), so the hashes are
reproducible on one machine (checked by recording twice from fresh builds). ONNX Runtime's CPU kernels
may round differently on another CPU family; re-record there with

    TOONARK_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

and check the diff only moved hashes, never requests.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import triton_repo, triton_server  # noqa: F401  (pytest fixtures)

from toonark import api
from toonark.serving.client import GenerateOptions, generate

pytestmark = pytest.mark.server

GOLDEN = Path(__file__).parent / "data" / "golden_images.json"
RECORD = os.environ.get("TOONARK_RECORD_GOLDEN") == "1"
SUBJECT = "a happy otter with a kite"

# name -> the request's inputs as GenerateOptions fields (None = not sent: the server's default applies).
REQUESTS: dict[str, dict] = {
    "defaults": dict(prompt=SUBJECT),   # default seed, preset steps, guidance, size, png
    "preset_fast_nonsquare": dict(prompt=SUBJECT, seed=7, preset="fast", guidance=3.0, width=64, height=128),
    "webp_quality": dict(prompt="a smiling turtle on a skateboard", seed=123456789, steps=3, guidance=12.0,
                         width=128, height=64, format="webp", quality=70),
    "num_images": dict(prompt=SUBJECT, seed=5, steps=2, width=64, height=64, num_images=2),
    "negative_webp_default_quality": dict(prompt="a friendly dragon baking cookies", negative_prompt="rain, clouds",
                                          seed=9, steps=3, width=64, height=64, format="webp"),
    "two_prompts_guidance_1": dict(prompt=[SUBJECT, "a sleepy bear in a hammock"], seed=3, steps=2, guidance=1.0,
                                   width=64, height=64),
    "guidance_0_one_step": dict(prompt="a dancing penguin", seed=2 ** 40, steps=1, guidance=0.0, width=192,
                                height=64),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served_hashes(server, request: dict) -> list[str]:
    result = generate(server.http_url, GenerateOptions(**request), "http")
    return [sha256(image) for image in result.images]


def offline_hashes(build: Path, request: dict) -> list[str]:
    """The same request through the offline pipeline, with preprocess' resolution spelled out: the policy's
    template and negative prompt, the preset's steps, the build's default size, one seed per image for
    NUM_IMAGES. Hashes the uint8 pixels (the server's encoder is not part of the offline path)."""
    from toonark.engines.pipeline import load_pipeline
    from toonark.pipeline import initial_latents
    from toonark.prompts import PromptPolicy
    from toonark.specs import BuildInfo
    info = BuildInfo.read(build)
    policy = PromptPolicy.load()
    subjects = request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]]
    count = request.get("num_images")
    subjects = subjects * (count or 1)
    pairs = [policy.compose(s, request.get("negative_prompt")) for s in subjects]
    size = info.limits.opt_image
    width, height = request.get("width") or size, request.get("height") or size
    seed = request.get("seed") or 0
    pipe = load_pipeline(build, backend="ort-cpu", precision="fp32", threads=1)
    latents = None
    if count:
        latents = np.concatenate([initial_latents(seed + i, 1, info.dims, height, width) for i in range(count)])
    result = pipe([p for p, _ in pairs], [n for _, n in pairs], seed=seed,
                  steps=policy.steps_for(request.get("preset"), request.get("steps")),
                  guidance=api.DEFAULT_GUIDANCE if request.get("guidance") is None else request["guidance"],
                  width=width, height=height, batch=len(pairs), latents=latents)
    return [sha256(np.ascontiguousarray(image).tobytes()) for image in result.images]


# The picture inputs (file bytes, not JSON) are pinned by tests/test_editing.py: served PNG bytes == offline for
# image-to-image, inpainting and tiled sizes, and the offline math == diffusers.
EDIT_INPUTS = {"IMAGE_IN", "MASK_IN", "STRENGTH"}


def test_golden_requests_cover_every_optional_input():
    sent = {key.upper() for request in REQUESTS.values() for key in request}
    # LORA / LORA_SCALE need a repository with a LoRA folder: tests/test_lora.py pins those images to the offline
    # pipeline's (interleaved, over HTTP and gRPC); the picture inputs are pinned by tests/test_editing.py.
    assert sent | EDIT_INPUTS == {port.name for port in api.ENSEMBLE_INPUTS} - {"LORA", "LORA_SCALE"}


def test_served_and_offline_images_match_the_golden_hashes(triton_server, tiny_engines):
    got = {name: {"served": served_hashes(triton_server, request), "offline": offline_hashes(tiny_engines, request)}
           for name, request in REQUESTS.items()}
    if RECORD:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"requests": REQUESTS, "sha256": got}, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["requests"] == json.loads(json.dumps(REQUESTS)), "requests changed: re-record (see docstring)"
    wrong = {name: {"expected": golden["sha256"][name], "got": hashes} for name, hashes in got.items()
             if hashes != golden["sha256"][name]}
    assert not wrong, f"images differ from the golden ones: {json.dumps(wrong, indent=1)}"
