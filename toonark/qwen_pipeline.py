"""The numpy Qwen-Image text-to-image pipeline over built engines: the Qwen-Image family's offline
reference (what a served request must draw), matched to diffusers' QwenImagePipeline on the tiny
folder (tests/test_qwen_image.py; tolerances in the README).

One request: the prompts and negative prompts in the chat template -> text encoder at 2B
[uncond x B, cond x B] -> drop the template's first tokens, pad both halves to one length with a mask
-> RoPE cos/sin for the image grid and text length -> flow-matching Euler over packed latents, the
transformer at 2B per step, true CFG with the norm-preserving rescale -> unpack, per-channel latent
normalisation -> VAE decoder. Every piece is a QwenImage family method (toonark.family), so the
served models can call the same code. Torch-free.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from toonark import api
from toonark.family import FAMILIES, QwenImage
from toonark.flow_match import FlowMatchEuler, true_cfg
from toonark.pipeline import Text2ImagePipeline, Text2ImageResult, to_uint8_hwc
from toonark.specs import QI, BuildInfo, PipelineDims, ShapeLimits

QWEN_IMAGE = FAMILIES[QwenImage.name]


def guided_velocity(prediction: np.ndarray, guidance: float) -> np.ndarray:
    """The transformer's (2B, tokens, 4C) [uncond x B, cond x B] output -> one velocity per image: true
    CFG with the norm rescale when guidance > 1 (QwenImagePipeline's do_true_cfg, a negative prompt is
    always sent), else the conditional prediction alone."""
    uncond, cond = np.split(prediction.astype(np.float32, copy=False), 2)
    return true_cfg(cond, uncond, guidance) if guidance > 1 else cond


def denoise(scheduler: FlowMatchEuler, latents: np.ndarray, conditioning: dict[str, np.ndarray], schedule,
            guidance: float, transformer: Callable[[dict[str, np.ndarray]], np.ndarray],
            step_callback=None) -> tuple[np.ndarray, list[float]]:
    """The flow-matching loop over packed latents (B, tokens, 4C); conditioning holds the transformer's
    text, mask and RoPE inputs. transformer(feeds) returns the (2B, ...) velocity. Returns (latents, ms per step)."""
    state = scheduler.initial_state(schedule)
    step_ms = []
    while not state.done:
        feeds = {QI.hidden_states: np.concatenate([latents, latents]),
                 QI.timestep: np.array([state.model_timestep], dtype=np.float32), **conditioning}
        if step_callback is not None:
            step_callback(state.step_index, state.timestep, feeds, latents)
        before = time.perf_counter()
        prediction = transformer(feeds)
        step_ms.append((time.perf_counter() - before) * 1e3)
        latents, state = scheduler.step(guided_velocity(prediction, guidance), latents, state)
    return latents, step_ms


class QwenImageText2ImagePipeline(Text2ImagePipeline):
    """Prompt -> images with the engines of one Qwen-Image build ({"text_encoder", "transformer",
    "vae_decoder": Engine}); same call and `generate` as the Stable Diffusion pipeline."""

    def __init__(self, engines: dict, tokenizer, scheduler: FlowMatchEuler, dims: PipelineDims,
                 limits: ShapeLimits | None = None, device_loop=None, family: QwenImage = QWEN_IMAGE):
        if device_loop is not None:
            raise ValueError("the device loop (engines/ort_loop.py) runs Stable Diffusion's UNet; Qwen-Image runs "
                             "on the host loop (device_loop=False)")
        super().__init__(engines, tokenizer, scheduler, dims, limits, None, family)

    def text_conditioning(self, prompts: list[str], negatives: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
        """(embeddings (2B, T, D), mask (2B, T)) and timings; refuses a prompt past the build's text axis."""
        start = time.perf_counter()
        ids, _ = self.family.encode_prompts(self.tokenizer, prompts, negatives, self.dims)
        lengths = self.family.token_lengths(ids, self.tokenizer.pad_id)
        longest = int(lengths.max()) - self.dims.template_drop
        limit = self.limits.max_text if self.limits is not None and self.limits.max_text else self.dims.text_length
        if longest > limit:
            raise api.RequestError(f"PROMPT is too long: {longest} tokens in the template, the build's text axis "
                                   f"takes {limit}; shorten the subject (or re-export with a larger --max-text)")
        tokenized = time.perf_counter()
        hidden = self.engines["text_encoder"].run({QI.input_ids: ids})[QI.text_embeddings]
        encoded = time.perf_counter()
        embeds, mask = self.family.text_conditioning(hidden.astype(np.float32, copy=False), lengths, self.dims)
        return embeds, mask, {"tokenize_ms": (tokenized - start) * 1e3, "text_encoder_ms": (encoded - tokenized) * 1e3}

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", seed: int = 0,
                 steps: int = 20, guidance: float = api.DEFAULT_GUIDANCE, width: int | None = None,
                 height: int | None = None, batch: int = 1, step_callback=None,
                 latents: np.ndarray | None = None) -> Text2ImageResult:
        """Generate `batch` images; latents (packed, (B, tokens, 4C)) overrides the seeded noise."""
        start = time.perf_counter()
        default_size = self.limits.opt_image if self.limits else 1024
        width, height = width or default_size, height or default_size
        scale = api.offline_batch_and_guidance(batch, guidance)
        low, high = api.GUIDANCE_RANGE
        if not math.isfinite(scale) or not low <= scale <= high:
            raise ValueError(f"guidance {guidance!r} is out of range; use {low:g}..{high:g} (Qwen-Image: 4.0 is typical)")
        if self.limits is not None:
            self.limits.check_request(batch, height, width)
        h, w = self.family.latent_grid(self.dims, height, width)
        prompts = self._prompts(prompt, batch, "prompt")
        negatives = self._prompts(negative_prompt, batch, "negative_prompt")
        if latents is None:
            latents = self.family.initial_latents(seed, batch, self.dims, height, width)
        expected = (batch, (h // self.dims.patch_size) * (w // self.dims.patch_size),
                    self.dims.latent_channels * self.dims.patch_size ** 2)
        if latents.shape != expected:
            raise ValueError(f"latents of shape {latents.shape} do not fit batch={batch} {height}x{width}; "
                             f"expected packed {expected}")
        schedule = self.scheduler.schedule(steps, expected[1])
        embeds, mask, timings = self.text_conditioning(prompts, negatives)
        img_rope, txt_rope = self.family.rope(self.dims, height, width, embeds.shape[1])
        conditioning = {QI.encoder_hidden_states: embeds, QI.encoder_hidden_states_mask: mask,
                        QI.img_rope: img_rope, QI.txt_rope: txt_rope}
        transformer = self.engines["transformer"]
        before = time.perf_counter()
        latents, step_ms = denoise(self.scheduler, latents.astype(np.float32), conditioning, schedule, scale,
                                   lambda feeds: transformer.run(feeds)[QI.noise_pred], step_callback)
        denoised = time.perf_counter()
        vae_input = self.family.latents_to_vae(self.family.unpack_latents(latents, h, w, self.dims.patch_size), self.dims)
        decoded = self.engines["vae_decoder"].run({QI.latent_sample: vae_input})[QI.image].astype(np.float32, copy=False)
        decoded_at = time.perf_counter()
        timings.update(transformer_ms=step_ms, unet_ms=step_ms, scheduler_ms=(denoised - before) * 1e3 - sum(step_ms),
                       vae_decoder_ms=(decoded_at - denoised) * 1e3, total_ms=(time.perf_counter() - start) * 1e3)
        return Text2ImageResult(images=to_uint8_hwc(decoded), decoded=decoded, timings=timings,
                                truncated=[False] * batch, timesteps=schedule.timesteps)

    def generate(self, policy=None, **request) -> Text2ImageResult:
        """A served request, offline, resolved by toonark.api.resolve_request exactly as for Stable Diffusion
        (template, negative prompt, presets, safety check, sizes); NUM_IMAGES draws image i from SEED + i."""
        if self.limits is None:
            raise ValueError("generate needs the build's limits (load the pipeline with "
                             "toonark.engines.pipeline.load_pipeline)")
        if policy is None:
            from toonark.prompts import PromptPolicy
            policy = PromptPolicy.load()
        resolved = api.resolve_request(BuildInfo(self.dims, self.limits), policy, **request)
        resolved.input_ids(self.tokenizer, self.family, self.dims)   # refuses a prompt past the text axis, as preprocess
        latents = None
        if resolved.image_seeds:
            latents = np.concatenate([self.family.initial_latents(s, 1, self.dims, resolved.height, resolved.width)
                                      for s in resolved.image_seeds])
        return self(list(resolved.prompts), list(resolved.negatives), seed=resolved.seed, steps=resolved.steps,
                    guidance=resolved.guidance, width=resolved.width, height=resolved.height, batch=resolved.batch,
                    latents=latents)
